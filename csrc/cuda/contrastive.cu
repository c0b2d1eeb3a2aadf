// CUDA kernels of the contrastive loss (DESIGN §1.1), a port of mmkd_kernels/triton/contrastive.py:
// z = scale · Â B̂ᵀ is recomputed tile by tile and never stored.
//
// - lse_kernel: for a block of 64 rows of A, streams over 64-column tiles of z with an online
//   log-sum-exp and picks each row's target logit in the same pass; the sum leaves the target out,
//   so a nearly aligned pair's small loss is log1p(Σ_{b≠t} e^{z_b − z_t}) with its digits (lse − z_t
//   would cancel them). On (q, k): the row statistics;
//   on (k, q) with targets = arange: the column statistics of the symmetric loss.
// - grad_kernel: for a block of 64 rows of A and a 64-wide chunk of D, recomputes the z tiles and
//   accumulates dÂ_a = scale · Σ_b dz_ab inv_b[b] B_b, dz with a row term g_a (softmax_b − [b = t_a])
//   and a column term g_b (softmax_a − [a = t'_b]); at a target the term is tg = g·expm1(−ℓ), given
//   by the caller, exact where softmax rounds to 1. On (q, k): dq̂; on (k, q): dk̂. Row-parallel, no
//   atomics; like the Triton kernel it recomputes z once per D chunk of the output.
//
// Tiles 64 × 64, D in chunks of 32, 256 threads; float32 by FMA, float16/bfloat16 by WMMA tensor
// cores, float32 accumulation (tiles.cuh). Dynamic shared memory (float32 / half inputs): lse
// 34 / 27.5 KiB, grad 53.5 / 38.5 KiB (opted in above 48 KiB).
//
// Validation: compiled with nvcc -arch=sm_90 and run on the CPU under emulation/ against the chunked
// backend (tests/test_cuda_sources.py); a run on a GPU is still owed.

#include <math.h>

#include "launchers.h"
#include "tiles.cuh"

namespace {

using namespace mmkd_tiles;

// Shared memory of lse_kernel: the z tile, the A/B chunks, inv_a and inv_b of the tile.
template <typename T>
struct LseLayout {
  static constexpr size_t kZ = 0;
  static constexpr size_t kStage = kZ + kTileBytes;
  static constexpr size_t kEdges = kStage + kStageBytes<T>;
  static constexpr size_t kTotal = kEdges + round_up(2 * kBlock * sizeof(float));
  static_assert(kTotal <= kMaxSharedBytes, "shared memory");
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_kernel(const T* __restrict__ A, const T* __restrict__ B, const float* __restrict__ inv_a,
               const float* __restrict__ inv_b, const int64_t* __restrict__ targets, float* __restrict__ lse,
               float* __restrict__ loss, int64_t n_a, int64_t n_b, int64_t d, int64_t stride_a, int64_t stride_ad,
               int64_t stride_b, int64_t stride_bd, float scale) {
  unsigned char* smem = dynamic_smem();
  using L = LseLayout<T>;
  float* Z = reinterpret_cast<float*>(smem + L::kZ);
  T* stage = reinterpret_cast<T*>(smem + L::kStage);
  float* s_inv_a = reinterpret_cast<float*>(smem + L::kEdges);
  float* s_inv_b = s_inv_a + kBlock;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  if (tid < kBlock) s_inv_a[tid] = a0 + tid < n_a ? inv_a[a0 + tid] : 0.0f;

  // Warp w keeps the running statistics of rows w·8 + r (every lane the same values).
  // row_other: Σ_{b ≠ target} exp(z_ab − row_max).
  float row_max[kRowsPerWarp], row_other[kRowsPerWarp], target_logit[kRowsPerWarp];
  int64_t target[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t a = a0 + warp * kRowsPerWarp + r;
    row_max[r] = -INFINITY;
    row_other[r] = 0.0f;
    target_logit[r] = 0.0f;
    target[r] = a < n_a ? targets[a] : -1;
  }

  for (int64_t b0 = 0; b0 < n_b; b0 += kBlock) {
    __syncthreads();  // the previous tile's readers of Z and s_inv_b are done
    if (tid < kBlock) s_inv_b[tid] = b0 + tid < n_b ? inv_b[b0 + tid] : 0.0f;
    dot_tile<T>(A, a0, n_a, stride_a, stride_ad, B, b0, n_b, stride_b, stride_bd, d, stage, Z);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = warp * kRowsPerWarp + r;
      const float ia = s_inv_a[i];
      float z[2];
      bool is_target[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        // inv_a·inv_b first, as the Triton kernel: the tile read by rows (q, k) and by columns
        // (k, q) then rounds alike.
        z[h] = b0 + j < n_b ? (Z[i * kTilePitch + j] * (ia * s_inv_b[j])) * scale : -INFINITY;
        is_target[h] = b0 + j == target[r];
      }
      const float new_max = fmaxf(row_max[r], warp_max(fmaxf(z[0], z[1])));
      const float tile_other = warp_sum((is_target[0] ? 0.0f : expf(z[0] - new_max)) +
                                        (is_target[1] ? 0.0f : expf(z[1] - new_max)));
      row_other[r] = row_other[r] * expf(row_max[r] - new_max) + tile_other;
      row_max[r] = new_max;
      const int64_t tj = target[r] - b0;
      if (tj >= 0 && tj < kBlock && b0 + tj < n_b) {
        const int j = static_cast<int>(tj);
        target_logit[r] += (Z[i * kTilePitch + j] * (ia * s_inv_b[j])) * scale;
      }
    }
  }

  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t a = a0 + warp * kRowsPerWarp + r;
      if (a < n_a) {
        // ℓ = log(w + o) − log w for the target's weight w = e^{z_t − max} and the others' o:
        // log1p(o / w) while the target dominates, log(w + o) − (z_t − max) otherwise.
        const float shifted_target = target_logit[r] - row_max[r];
        const float weight = expf(shifted_target);
        const float total = weight + row_other[r];
        lse[a] = row_max[r] + logf(total);
        loss[a] = weight >= row_other[r] ? log1pf(row_other[r] / weight) : logf(total) - shifted_target;
      }
    }
  }
}

// Shared memory of grad_kernel: the z tile, the dz operand tile, the A/B chunks sharing a region
// with the B tile of the product, and the per-row (a) and per-column (b) vectors of the tile.
template <typename T>
struct GradLayout {
  static constexpr size_t kZ = 0;
  static constexpr size_t kP = kZ + kTileBytes;
  static constexpr size_t kStage = kP + kOperandBytes<T>;
  static constexpr size_t kFloats = kStage + kStageOrOperandBytes<T>;              // 8 × kBlock floats
  static constexpr size_t kIndices = kFloats + round_up(8 * kBlock * sizeof(float));  // 2 × kBlock int64
  static constexpr size_t kTotal = kIndices + round_up(2 * kBlock * sizeof(int64_t));
  static_assert(kTotal <= kMaxSharedBytes, "shared memory");
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* __restrict__ A, const T* __restrict__ B, const float* __restrict__ inv_a,
                const float* __restrict__ inv_b, const float* __restrict__ lse_a, const float* __restrict__ g_a,
                const int64_t* __restrict__ t_a, const float* __restrict__ tg_a, const float* __restrict__ lse_b,
                const float* __restrict__ g_b, const int64_t* __restrict__ t_b, const float* __restrict__ tg_b,
                float* __restrict__ dA, int64_t n_a, int64_t n_b, int64_t d,
                int64_t stride_a, int64_t stride_ad, int64_t stride_b, int64_t stride_bd, float scale) {
  unsigned char* smem = dynamic_smem();
  using L = GradLayout<T>;
  float* Z = reinterpret_cast<float*>(smem + L::kZ);
  T* Pm = reinterpret_cast<T*>(smem + L::kP);
  T* stage = reinterpret_cast<T*>(smem + L::kStage);  // dot_tile's chunks, then the B tile of dz·B
  float* s_inv_a = reinterpret_cast<float*>(smem + L::kFloats);
  float* s_lse_a = s_inv_a + kBlock;
  float* s_g_a = s_lse_a + kBlock;
  float* s_inv_b = s_g_a + kBlock;
  float* s_lse_b = s_inv_b + kBlock;
  float* s_g_b = s_lse_b + kBlock;
  float* s_tg_a = s_g_b + kBlock;
  float* s_tg_b = s_tg_a + kBlock;
  int64_t* s_t_a = reinterpret_cast<int64_t*>(smem + L::kIndices);
  int64_t* s_t_b = s_t_a + kBlock;

  const bool has_a = lse_a != nullptr;  // uniform over the grid
  const bool has_b = lse_b != nullptr;
  const int tid = threadIdx.x;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t do0 = static_cast<int64_t>(blockIdx.y) * kBlock;
  if (tid < kBlock) {
    const int64_t a = a0 + tid;
    const bool in = a < n_a;
    s_inv_a[tid] = in ? inv_a[a] : 0.0f;
    s_lse_a[tid] = in && has_a ? lse_a[a] : 0.0f;
    s_g_a[tid] = in && has_a ? g_a[a] : 0.0f;
    s_t_a[tid] = in && has_a ? t_a[a] : -1;
    s_tg_a[tid] = in && has_a ? tg_a[a] : 0.0f;
  }

  OutAcc<T> acc;
  acc.zero();
  for (int64_t b0 = 0; b0 < n_b; b0 += kBlock) {
    __syncthreads();  // the previous tile's readers of the b vectors, Pm and the B tile are done
    if (tid < kBlock) {
      const int64_t b = b0 + tid;
      const bool in = b < n_b;
      s_inv_b[tid] = in ? inv_b[b] : 0.0f;
      s_lse_b[tid] = in && has_b ? lse_b[b] : 0.0f;
      s_g_b[tid] = in && has_b ? g_b[b] : 0.0f;
      s_t_b[tid] = in && has_b ? t_b[b] : -1;
      s_tg_b[tid] = in && has_b ? tg_b[b] : 0.0f;
    }
    dot_tile<T>(A, a0, n_a, stride_a, stride_ad, B, b0, n_b, stride_b, stride_bd, d, stage, Z);
#pragma unroll 4
    for (int e = tid; e < kBlock * kBlock; e += kThreads) {
      const int i = e / kBlock;
      const int j = e % kBlock;
      float dz = 0.0f;
      if (a0 + i < n_a && b0 + j < n_b) {
        const float z = (Z[i * kTilePitch + j] * (s_inv_a[i] * s_inv_b[j])) * scale;
        if (has_a) dz += b0 + j == s_t_a[i] ? s_tg_a[i] : s_g_a[i] * expf(z - s_lse_a[i]);
        if (has_b) dz += a0 + i == s_t_b[j] ? s_tg_b[j] : s_g_b[j] * expf(z - s_lse_b[j]);
        dz = dz * (s_inv_b[j] * scale);
      }
      Pm[i * Traits<T>::kOperandPitch + j] = Traits<T>::from_float(dz);
    }
    accumulate_px<T>(Pm, B, b0, n_b, stride_b, stride_bd, do0, d, stage, acc);
  }
  __syncthreads();  // no thread reads Z any more: store_out may stage in it
  store_out<T>(acc, dA, a0, n_a, do0, d, Z);
}

bool valid_sizes(int64_t n_a, int64_t n_b, int64_t d) { return n_a >= 0 && n_b >= 0 && d >= 0; }

bool valid_dtype(int dtype) { return dtype == MMKD_FLOAT32 || dtype == MMKD_FLOAT16 || dtype == MMKD_BFLOAT16; }

template <typename T>
int lse(const void* A, const void* B, const float* inv_a, const float* inv_b, const int64_t* targets, float* lse_out,
        float* loss, int64_t n_a, int64_t n_b, int64_t d, int64_t stride_a, int64_t stride_ad, int64_t stride_b,
        int64_t stride_bd, float scale, cudaStream_t stream) {
  const unsigned int blocks = blocks_of(n_a, 0x7fffffff);
  if (blocks == 0) return cudaErrorInvalidValue;
  return launch(lse_kernel<T>, dim3(blocks), LseLayout<T>::kTotal, stream, static_cast<const T*>(A),
                static_cast<const T*>(B), inv_a, inv_b, targets, lse_out, loss, n_a, n_b, d, stride_a, stride_ad,
                stride_b, stride_bd, scale);
}

template <typename T>
int grad(const void* A, const void* B, const float* inv_a, const float* inv_b, const float* lse_a, const float* g_a,
         const int64_t* t_a, const float* tg_a, const float* lse_b, const float* g_b, const int64_t* t_b,
         const float* tg_b, float* dA, int64_t n_a,
         int64_t n_b, int64_t d, int64_t stride_a, int64_t stride_ad, int64_t stride_b, int64_t stride_bd,
         float scale, cudaStream_t stream) {
  const unsigned int row_blocks = blocks_of(n_a, 0x7fffffff);
  const unsigned int d_blocks = blocks_of(d, 65535);
  if (row_blocks == 0 || d_blocks == 0) return cudaErrorInvalidValue;
  return launch(grad_kernel<T>, dim3(row_blocks, d_blocks), GradLayout<T>::kTotal, stream, static_cast<const T*>(A),
                static_cast<const T*>(B), inv_a, inv_b, lse_a, g_a, t_a, tg_a, lse_b, g_b, t_b, tg_b, dA, n_a, n_b,
                d, stride_a, stride_ad, stride_b, stride_bd, scale);
}

// A term's four pointers are all given or all NULL.
bool consistent(const void* lse, const void* g, const void* t, const void* tg) {
  return (lse == nullptr) == (g == nullptr) && (g == nullptr) == (t == nullptr) && (t == nullptr) == (tg == nullptr);
}

}  // namespace

extern "C" int mmkd_contrastive_lse(int dtype, const void* A, const void* B, const float* inv_a, const float* inv_b,
                                    const int64_t* targets, float* lse_out, float* loss, int64_t n_a, int64_t n_b,
                                    int64_t d, int64_t stride_a, int64_t stride_ad, int64_t stride_b,
                                    int64_t stride_bd, float scale, cudaStream_t stream) {
  if (!valid_dtype(dtype) || !valid_sizes(n_a, n_b, d)) return cudaErrorInvalidValue;
  if (n_a == 0) return cudaSuccess;
  switch (dtype) {
    case MMKD_FLOAT32:
      return lse<float>(A, B, inv_a, inv_b, targets, lse_out, loss, n_a, n_b, d, stride_a, stride_ad, stride_b,
                        stride_bd, scale, stream);
    case MMKD_FLOAT16:
      return lse<__half>(A, B, inv_a, inv_b, targets, lse_out, loss, n_a, n_b, d, stride_a, stride_ad, stride_b,
                         stride_bd, scale, stream);
    case MMKD_BFLOAT16:
      return lse<__nv_bfloat16>(A, B, inv_a, inv_b, targets, lse_out, loss, n_a, n_b, d, stride_a, stride_ad,
                                stride_b, stride_bd, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int mmkd_contrastive_grad(int dtype, const void* A, const void* B, const float* inv_a, const float* inv_b,
                                     const float* lse_a, const float* g_a, const int64_t* t_a, const float* tg_a,
                                     const float* lse_b, const float* g_b, const int64_t* t_b, const float* tg_b,
                                     float* dA, int64_t n_a, int64_t n_b,
                                     int64_t d, int64_t stride_a, int64_t stride_ad, int64_t stride_b,
                                     int64_t stride_bd, float scale, cudaStream_t stream) {
  if (!valid_dtype(dtype) || !valid_sizes(n_a, n_b, d) || !consistent(lse_a, g_a, t_a, tg_a) ||
      !consistent(lse_b, g_b, t_b, tg_b))
    return cudaErrorInvalidValue;
  if (n_a == 0 || d == 0) return cudaSuccess;
  switch (dtype) {
    case MMKD_FLOAT32:
      return grad<float>(A, B, inv_a, inv_b, lse_a, g_a, t_a, tg_a, lse_b, g_b, t_b, tg_b, dA, n_a, n_b, d,
                         stride_a, stride_ad, stride_b, stride_bd, scale, stream);
    case MMKD_FLOAT16:
      return grad<__half>(A, B, inv_a, inv_b, lse_a, g_a, t_a, tg_a, lse_b, g_b, t_b, tg_b, dA, n_a, n_b, d,
                          stride_a, stride_ad, stride_b, stride_bd, scale, stream);
    case MMKD_BFLOAT16:
      return grad<__nv_bfloat16>(A, B, inv_a, inv_b, lse_a, g_a, t_a, tg_a, lse_b, g_b, t_b, tg_b, dA, n_a, n_b, d,
                                 stride_a, stride_ad, stride_b, stride_bd, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
