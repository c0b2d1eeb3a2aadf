// CUDA kernels of the contrastive loss (DESIGN §1.1), a port of mmkd_kernels/triton/contrastive.py:
// z = scale · Â B̂ᵀ is recomputed tile by tile and never stored.
//
// - lse_kernel: for a block of 64 rows of A, streams over 64-column tiles of z with an online
//   log-sum-exp and picks each row's target logit in the same pass; the sum leaves the target out,
//   so a nearly aligned pair's small loss is log1p(Σ_{b≠t} e^{z_b − z_t}) with its digits (lse − z_t
//   would cancel them). On (q, k): the row statistics. The symmetric loss's column statistics come
//   from the same pass where z is bounded (fixed-shift column sums added atomically), else from a
//   run on (k, q) with targets = arange.
// - grad_kernel: for a block of 64 rows of A and CHUNKS 64-wide chunks of D (tiles.cuh: 2 for
//   D ≤ 128, else 6), recomputes the z tiles and accumulates dÂ_a = scale · Σ_b dz_ab inv_b[b] B_b,
//   dz with a row term g_a (softmax_b − [b = t_a]) and a column term g_b (softmax_a − [a = t'_b]);
//   at a target the term is tg = g·expm1(−ℓ), given by the caller, exact where softmax rounds to 1.
//   On (q, k): dq̂; on (k, q): dk̂. Row-parallel, no atomics; z is computed once per 64 · CHUNKS
//   columns of the output (once at D = 384).
// - lse_grad_kernel: lse_kernel and grad_kernel's row term in one pass, for the loss of a sum or a
//   mean over normalized rows (|z| ≤ |scale| ≤ 40): the sums are taken under the fixed shift |scale|,
//   so the accumulator of e^{z − shift} B̂ never needs the rescaling that a running max would ask
//   of it (a WMMA fragment's rows cannot be scaled in place). The frozen-teacher training step
//   computes z once at D = 384 where the two kernels compute it twice.
//
// Tiles 64 × 64, D in chunks of 32, 256 threads; float32 by FMA, float16/bfloat16 by WMMA tensor
// cores (float16's gradient products in TF32: tiles.cuh Traits), float32 accumulation. Dynamic
// shared memory (float32 / float16 / bfloat16 inputs): lse 36 / 29.5 / 29.5 KiB, grad
// 54 / 54 / 39 KiB, lse_grad 52.5 / 52.5 / 37.5 KiB (opted in above 48 KiB).
//
// Validation: compiled with nvcc -arch=sm_90 and run on the CPU under emulation/ against the chunked
// backend (tests/test_cuda_sources.py); a run on a GPU is still owed.

#include <math.h>

#include "launchers.h"
#include "tiles.cuh"

namespace {

using namespace mmkd_tiles;

// z[i][j] of a tile from its raw dot product; inv_a·inv_b first, so that the tile read by rows
// (q, k) and by columns (k, q) rounds alike.
__device__ __forceinline__ float logit(const float* Z, int i, int j, float inv_a, const float* s_inv_b, float scale) {
  return (Z[i * kTilePitch + j] * (inv_a * s_inv_b[j])) * scale;
}

// A row's results from its sums under a shift (its running max, or a fixed bound): the target's
// weight w = e^{z_t − shift} and the others' o = Σ_{b≠t} e^{z_b − shift}.
struct RowEnd {
  float lse;    // shift + log(w + o)
  float loss;   // ℓ = log(w + o) − log w
  float total;  // w + o
};

__device__ __forceinline__ RowEnd end_row(float shift, float target_logit, float other) {
  const float shifted_target = target_logit - shift;
  const float weight = expf(shifted_target);
  const float total = weight + other;
  // log1p(o / w) while the target dominates (a nearly aligned pair keeps its digits),
  // log(w + o) − (z_t − shift) otherwise.
  const float loss = weight >= other ? log1pf(other / weight) : logf(total) - shifted_target;
  return RowEnd{shift + logf(total), loss, total};
}

// Shared memory of lse_kernel: the z tile, the A/B chunks, inv_a and inv_b of the tile, and the
// warps' partial column sums of the tile (kWarps × kBlock).
template <typename T>
struct LseLayout {
  static constexpr size_t kZ = 0;
  static constexpr size_t kStage = kZ + kTileBytes;
  static constexpr size_t kEdges = kStage + kStageBytes<T>;
  static constexpr size_t kColumns = kEdges + round_up(2 * kBlock * sizeof(float));
  static constexpr size_t kTotal = kColumns + round_up(kWarps * kBlock * sizeof(float));
  static_assert(kTotal <= kMaxSharedBytes, "shared memory");
};

// With col_other (not NULL): the columns' sums of the symmetric loss in the same pass, under the
// fixed shift (every |z| ≤ shift ≤ MMKD_FIXED_SHIFT_MAX): col_other[b] += Σ_{a≠b} e^{z_ab − shift}
// over the block's rows (atomically: blocks add in no fixed order), and col_target[b] = z_bb from
// the one block that holds row b. The rows then take the same shift: one exponential serves both
// sums, and no tile computes a row max.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_kernel(const T* __restrict__ A, const T* __restrict__ B, const float* __restrict__ inv_a,
               const float* __restrict__ inv_b, const int64_t* __restrict__ targets, float* __restrict__ lse,
               float* __restrict__ loss, float* __restrict__ col_other, float* __restrict__ col_target, int64_t n_a,
               int64_t n_b, int64_t d, int64_t stride_a, int64_t stride_ad, int64_t stride_b, int64_t stride_bd,
               float scale, float shift) {
  unsigned char* smem = dynamic_smem();
  using L = LseLayout<T>;
  float* Z = reinterpret_cast<float*>(smem + L::kZ);
  T* stage = reinterpret_cast<T*>(smem + L::kStage);
  float* s_inv_a = reinterpret_cast<float*>(smem + L::kEdges);
  float* s_inv_b = s_inv_a + kBlock;
  float* s_columns = reinterpret_cast<float*>(smem + L::kColumns);  // [warp][column]
  const bool columns = col_other != nullptr;                         // uniform over the grid

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
    row_max[r] = columns ? shift : -INFINITY;  // the rows take the columns' fixed shift
    row_other[r] = 0.0f;
    target_logit[r] = 0.0f;
    target[r] = a < n_a ? targets[a] : -1;
  }

  for (int64_t b0 = 0; b0 < n_b; b0 += kBlock) {
    __syncthreads();  // the previous tile's readers of Z and s_inv_b are done
    if (tid < kBlock) s_inv_b[tid] = b0 + tid < n_b ? inv_b[b0 + tid] : 0.0f;
    dot_tile<T>(A, a0, n_a, stride_a, stride_ad, B, b0, n_b, stride_b, stride_bd, d, stage, Z);
    float column_part[2] = {0.0f, 0.0f};  // this lane's columns, over the warp's rows
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = warp * kRowsPerWarp + r;
      const float ia = s_inv_a[i];
      float z[2];
      bool is_target[2];
      float row_part = 0.0f;  // with columns: this lane's Σ_{b≠t} e^{z_ab − shift}
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        z[h] = b0 + j < n_b ? logit(Z, i, j, ia, s_inv_b, scale) : -INFINITY;
        is_target[h] = b0 + j == target[r];
        if (columns) {
          const float weight = expf(z[h] - shift);  // 0 past n_b; one exponential for both sums
          if (!is_target[h]) row_part += weight;
          if (a0 + i < n_a && b0 + j < n_b) {
            if (a0 + i == b0 + j) {
              col_target[b0 + j] = z[h];
            } else {
              column_part[h] += weight;
            }
          }
        }
      }
      if (columns) {
        row_other[r] += warp_sum(row_part);  // under the fixed shift: row_max[r] stays `shift`
      } else {
        const float new_max = fmaxf(row_max[r], warp_max(fmaxf(z[0], z[1])));
        const float tile_other = warp_sum((is_target[0] ? 0.0f : expf(z[0] - new_max)) +
                                          (is_target[1] ? 0.0f : expf(z[1] - new_max)));
        row_other[r] = row_other[r] * expf(row_max[r] - new_max) + tile_other;
        row_max[r] = new_max;
      }
      const int64_t tj = target[r] - b0;
      if (tj >= 0 && tj < kBlock && b0 + tj < n_b) {
        const int j = static_cast<int>(tj);
        target_logit[r] += logit(Z, i, j, ia, s_inv_b, scale);
      }
    }
    if (columns) {
      s_columns[warp * kBlock + lane] = column_part[0];
      s_columns[warp * kBlock + lane + 32] = column_part[1];
      __syncthreads();
      if (tid < kBlock && b0 + tid < n_b) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += s_columns[w * kBlock + tid];
        atomicAdd(col_other + b0 + tid, sum);
      }
    }
  }

  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t a = a0 + warp * kRowsPerWarp + r;
      if (a < n_a) {
        const RowEnd row = end_row(row_max[r], target_logit[r], row_other[r]);
        lse[a] = row.lse;
        loss[a] = target[r] >= 0 && target[r] < n_b ? row.loss : NAN;  // no target: a direct call's bad one
      }
    }
  }
}

// Shared memory of lse_grad_kernel: the z tile, the p operand tile, the A/B chunks sharing a region
// with the B tile of the product, inv_a and inv_b of the tile and the rows' epilogue factors.
template <typename T>
struct LseGradLayout {
  static constexpr size_t kZ = 0;
  static constexpr size_t kP = kZ + kTileBytes;
  static constexpr size_t kStage = kP + kOperandBytes<T>;
  static constexpr size_t kFloats = kStage + kStageOrOperandBytes<T>;              // 4 × kBlock floats
  static constexpr size_t kIndices = kFloats + round_up(4 * kBlock * sizeof(float));  // kBlock int64
  static constexpr size_t kTotal = kIndices + round_up(kBlock * sizeof(int64_t));
  static_assert(kTotal <= kMaxSharedBytes, "shared memory");
};

// lse_kernel and grad_kernel's row term (g = 1) in one pass, for |z| ≤ shift: the sums are taken
// under the fixed shift instead of a running max, so that the accumulator of
//   U_a = Σ_{b≠t_a} e^{z_ab − shift} B̂_b
// never needs rescaling (a WMMA accumulator's rows cannot be scaled in place), and the epilogue
// writes dÂ_a = scale · (U_a / l_a + expm1(−ℓ_a) B̂_{t_a}), l_a = Σ_b e^{z_ab − shift}: the softmax
// minus the one-hot target, with the target's p − 1 exact where it rounds to 0. Blocks of y > 0
// (D above kBlock · CHUNKS) recompute the statistics; only y = 0 writes lse and loss.
template <typename T, int CHUNKS>
__global__ void __launch_bounds__(kThreads)
    lse_grad_kernel(const T* __restrict__ A, const T* __restrict__ B, const float* __restrict__ inv_a,
                    const float* __restrict__ inv_b, const int64_t* __restrict__ targets, float* __restrict__ lse,
                    float* __restrict__ loss, float* __restrict__ dA, int64_t n_a, int64_t n_b, int64_t d,
                    int64_t stride_a, int64_t stride_ad, int64_t stride_b, int64_t stride_bd, float scale,
                    float shift) {
  unsigned char* smem = dynamic_smem();
  using L = LseGradLayout<T>;
  constexpr int OP = Traits<T>::kOperandPitch;
  float* Z = reinterpret_cast<float*>(smem + L::kZ);
  Operand<T>* Pm = reinterpret_cast<Operand<T>*>(smem + L::kP);
  T* stage = reinterpret_cast<T*>(smem + L::kStage);  // dot_tile's chunks, then
  Operand<T>* Xs = reinterpret_cast<Operand<T>*>(stage);  // the B tile of p·B
  float* s_inv_a = reinterpret_cast<float*>(smem + L::kFloats);
  float* s_inv_b = s_inv_a + kBlock;
  float* s_row_factor = s_inv_b + kBlock;     // scale / l_a
  float* s_target_factor = s_row_factor + kBlock;  // scale · expm1(−ℓ_a) · inv_b[t_a]
  int64_t* s_target = reinterpret_cast<int64_t*>(smem + L::kIndices);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t do_first = static_cast<int64_t>(blockIdx.y) * kBlock * CHUNKS;
  if (tid < kBlock) s_inv_a[tid] = a0 + tid < n_a ? inv_a[a0 + tid] : 0.0f;

  // Warp w keeps the sums of rows w·8 + r, as lse_kernel (every lane the same values).
  float row_other[kRowsPerWarp], target_logit[kRowsPerWarp];
  int64_t target[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t a = a0 + warp * kRowsPerWarp + r;
    row_other[r] = 0.0f;
    target_logit[r] = 0.0f;
    target[r] = a < n_a ? targets[a] : -1;
  }

  OutAccs<T, CHUNKS> accs;
  accs.zero();
  for (int64_t b0 = 0; b0 < n_b; b0 += kBlock) {
    __syncthreads();  // the previous tile's readers of Z, Pm, the B tile and s_inv_b are done
    if (tid < kBlock) s_inv_b[tid] = b0 + tid < n_b ? inv_b[b0 + tid] : 0.0f;
    dot_tile<T>(A, a0, n_a, stride_a, stride_ad, B, b0, n_b, stride_b, stride_bd, d, stage, Z);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = warp * kRowsPerWarp + r;
      const float ia = s_inv_a[i];
      float e[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        const bool other = b0 + j < n_b && b0 + j != target[r];
        e[h] = other ? expf(logit(Z, i, j, ia, s_inv_b, scale) - shift) : 0.0f;  // ≤ 1 up to z's rounding
        Pm[i * OP + j] = Traits<T>::to_operand(e[h] * s_inv_b[j]);
      }
      row_other[r] += warp_sum(e[0] + e[1]);
      const int64_t tj = target[r] - b0;
      if (tj >= 0 && tj < kBlock && b0 + tj < n_b) {
        const int j = static_cast<int>(tj);
        target_logit[r] += logit(Z, i, j, ia, s_inv_b, scale);
      }
    }
    accumulate_px_chunks<T, CHUNKS>(Pm, B, b0, n_b, stride_b, stride_bd, do_first, d, Xs, accs);
  }

  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = warp * kRowsPerWarp + r;
      const int64_t a = a0 + i;
      float row_factor = 0.0f, target_factor = 0.0f;
      // A target outside [0, n_b) (a direct call of the op; the public losses check theirs) gives its
      // row a NaN loss and gradient, and no read outside B: the reads take row 0 instead.
      const bool has_target = target[r] >= 0 && target[r] < n_b;
      if (a < n_a) {
        const RowEnd row = end_row(shift, target_logit[r], row_other[r]);
        const float row_loss = has_target ? row.loss : NAN;
        if (blockIdx.y == 0) {
          lse[a] = row.lse;
          loss[a] = row_loss;
        }
        row_factor = scale / row.total;
        target_factor = scale * expm1f(-row_loss) * inv_b[has_target ? target[r] : 0];
      }
      s_row_factor[i] = row_factor;
      s_target_factor[i] = target_factor;
      s_target[i] = a < n_a && has_target ? target[r] : 0;
    }
  }
  __syncthreads();  // the factors are visible, and no thread reads Z any more: store_out may stage in it
  store_out_chunks<T, CHUNKS>(accs, dA, a0, n_a, do_first, d, Z, [&](int i, int64_t col, float u) {
    const float b_target = Traits<T>::to_float(B[s_target[i] * stride_b + col * stride_bd]);
    return u * s_row_factor[i] + s_target_factor[i] * b_target;
  });
}

// One side's vectors of a tile in shared memory (the tile's rows a or its columns b): the inverse
// norms and that side's term of dz (log-sum-exps, weights g, targets t, target entries tg).
struct TermVectors {
  float* inv;
  float* lse;
  float* g;
  float* tg;
  int64_t* t;
  static constexpr int kFloatVectors = 4;
  __device__ TermVectors(float* floats, int64_t* indices)
      : inv(floats), lse(floats + kBlock), g(floats + 2 * kBlock), tg(floats + 3 * kBlock), t(indices) {}
  // Entry r for row `first + r`: zeros (and target −1) past `end` or where the term is off (lse_g
  // NULL). Threads 0 .. kBlock − 1 call it.
  __device__ void load(int r, int64_t first, int64_t end, const float* inv_g, const float* lse_g, const float* g_g,
                       const int64_t* t_g, const float* tg_g) const {
    const int64_t row = first + r;
    const bool in = row < end;
    const bool on = in && lse_g != nullptr;
    inv[r] = in ? inv_g[row] : 0.0f;
    lse[r] = on ? lse_g[row] : 0.0f;
    g[r] = on ? g_g[row] : 0.0f;
    t[r] = on ? t_g[row] : -1;
    tg[r] = on ? tg_g[row] : 0.0f;
  }
};

// Shared memory of grad_kernel: the z tile, the dz operand tile, the A/B chunks sharing a region
// with the B tile of the product, and the vectors of the tile's rows (a) and columns (b).
template <typename T>
struct GradLayout {
  static constexpr size_t kZ = 0;
  static constexpr size_t kP = kZ + kTileBytes;
  static constexpr size_t kStage = kP + kOperandBytes<T>;
  static constexpr size_t kFloatsA = kStage + kStageOrOperandBytes<T>;
  static constexpr size_t kFloatsB = kFloatsA + round_up(TermVectors::kFloatVectors * kBlock * sizeof(float));
  static constexpr size_t kIndicesA = kFloatsB + round_up(TermVectors::kFloatVectors * kBlock * sizeof(float));
  static constexpr size_t kIndicesB = kIndicesA + round_up(kBlock * sizeof(int64_t));
  static constexpr size_t kTotal = kIndicesB + round_up(kBlock * sizeof(int64_t));
  static_assert(kTotal <= kMaxSharedBytes, "shared memory");
};

template <typename T, int CHUNKS>
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
  Operand<T>* Pm = reinterpret_cast<Operand<T>*>(smem + L::kP);
  T* stage = reinterpret_cast<T*>(smem + L::kStage);  // dot_tile's chunks, then
  Operand<T>* Xs = reinterpret_cast<Operand<T>*>(stage);  // the B tile of dz·B
  const TermVectors va(reinterpret_cast<float*>(smem + L::kFloatsA), reinterpret_cast<int64_t*>(smem + L::kIndicesA));
  const TermVectors vb(reinterpret_cast<float*>(smem + L::kFloatsB), reinterpret_cast<int64_t*>(smem + L::kIndicesB));

  const bool has_a = lse_a != nullptr;  // uniform over the grid
  const bool has_b = lse_b != nullptr;
  const int tid = threadIdx.x;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t do_first = static_cast<int64_t>(blockIdx.y) * kBlock * CHUNKS;
  if (tid < kBlock) va.load(tid, a0, n_a, inv_a, lse_a, g_a, t_a, tg_a);

  OutAccs<T, CHUNKS> accs;
  accs.zero();
  for (int64_t b0 = 0; b0 < n_b; b0 += kBlock) {
    __syncthreads();  // the previous tile's readers of the b vectors, Pm and the B tile are done
    if (tid < kBlock) vb.load(tid, b0, n_b, inv_b, lse_b, g_b, t_b, tg_b);
    dot_tile<T>(A, a0, n_a, stride_a, stride_ad, B, b0, n_b, stride_b, stride_bd, d, stage, Z);
#pragma unroll 4
    for (int e = tid; e < kBlock * kBlock; e += kThreads) {
      const int i = e / kBlock;
      const int j = e % kBlock;
      float dz = 0.0f;
      if (a0 + i < n_a && b0 + j < n_b) {
        const float z = logit(Z, i, j, va.inv[i], vb.inv, scale);
        if (has_a) dz += b0 + j == va.t[i] ? va.tg[i] : va.g[i] * expf(z - va.lse[i]);
        if (has_b) dz += a0 + i == vb.t[j] ? vb.tg[j] : vb.g[j] * expf(z - vb.lse[j]);
        dz = dz * (vb.inv[j] * scale);
      }
      Pm[i * Traits<T>::kOperandPitch + j] = Traits<T>::to_operand(dz);
    }
    accumulate_px_chunks<T, CHUNKS>(Pm, B, b0, n_b, stride_b, stride_bd, do_first, d, Xs, accs);
  }
  __syncthreads();  // no thread reads Z any more: store_out may stage in it
  store_out_chunks<T, CHUNKS>(accs, dA, a0, n_a, do_first, d, Z);
}

bool valid_sizes(int64_t n_a, int64_t n_b, int64_t d) { return n_a >= 0 && n_b >= 0 && d >= 0; }

template <typename T>
int lse(const void* A, const void* B, const float* inv_a, const float* inv_b, const int64_t* targets, float* lse_out,
        float* loss, float* col_other, float* col_target, int64_t n_a, int64_t n_b, int64_t d, int64_t stride_a,
        int64_t stride_ad, int64_t stride_b, int64_t stride_bd, float scale, float shift, cudaStream_t stream) {
  const unsigned int blocks = blocks_of(n_a, 0x7fffffff);
  if (blocks == 0) return cudaErrorInvalidValue;
  return launch(lse_kernel<T>, dim3(blocks), LseLayout<T>::kTotal, stream, static_cast<const T*>(A),
                static_cast<const T*>(B), inv_a, inv_b, targets, lse_out, loss, col_other, col_target, n_a, n_b, d,
                stride_a, stride_ad, stride_b, stride_bd, scale, shift);
}

template <typename T>
int lse_grad(const void* A, const void* B, const float* inv_a, const float* inv_b, const int64_t* targets,
             float* lse_out, float* loss, float* dA, int64_t n_a, int64_t n_b, int64_t d, int64_t stride_a,
             int64_t stride_ad, int64_t stride_b, int64_t stride_bd, float scale, float shift, cudaStream_t stream) {
  return with_output_chunks(d, [&](auto chunks) -> int {
    constexpr int CHUNKS = decltype(chunks)::value;
    dim3 grid;
    if (!gradient_grid(n_a, d, CHUNKS, &grid)) return cudaErrorInvalidValue;
    return launch(lse_grad_kernel<T, CHUNKS>, grid, LseGradLayout<T>::kTotal, stream,
                  static_cast<const T*>(A), static_cast<const T*>(B), inv_a, inv_b, targets, lse_out, loss, dA, n_a,
                  n_b, d, stride_a, stride_ad, stride_b, stride_bd, scale, shift);
  });
}

template <typename T>
int grad(const void* A, const void* B, const float* inv_a, const float* inv_b, const float* lse_a, const float* g_a,
         const int64_t* t_a, const float* tg_a, const float* lse_b, const float* g_b, const int64_t* t_b,
         const float* tg_b, float* dA, int64_t n_a, int64_t n_b, int64_t d, int64_t stride_a, int64_t stride_ad,
         int64_t stride_b, int64_t stride_bd, float scale, cudaStream_t stream) {
  return with_output_chunks(d, [&](auto chunks) -> int {
    constexpr int CHUNKS = decltype(chunks)::value;
    dim3 grid;
    if (!gradient_grid(n_a, d, CHUNKS, &grid)) return cudaErrorInvalidValue;
    return launch(grad_kernel<T, CHUNKS>, grid, GradLayout<T>::kTotal, stream,
                  static_cast<const T*>(A), static_cast<const T*>(B), inv_a, inv_b, lse_a, g_a, t_a, tg_a, lse_b,
                  g_b, t_b, tg_b, dA, n_a, n_b, d, stride_a, stride_ad, stride_b, stride_bd, scale);
  });
}

// A term's four pointers are all given or all NULL.
bool consistent(const void* lse, const void* g, const void* t, const void* tg) {
  return (lse == nullptr) == (g == nullptr) && (g == nullptr) == (t == nullptr) && (t == nullptr) == (tg == nullptr);
}

}  // namespace

extern "C" int mmkd_contrastive_lse(int dtype, const void* A, const void* B, const float* inv_a, const float* inv_b,
                                    const int64_t* targets, float* lse_out, float* loss, float* col_other,
                                    float* col_target, int64_t n_a, int64_t n_b, int64_t d, int64_t stride_a,
                                    int64_t stride_ad, int64_t stride_b, int64_t stride_bd, float scale, float shift,
                                    cudaStream_t stream) {
  const bool columns = col_other != nullptr;
  if (!valid_dtype(dtype) || !valid_sizes(n_a, n_b, d) || columns != (col_target != nullptr) ||
      (columns && (n_a != n_b || !(shift >= 0.0f) || shift > MMKD_FIXED_SHIFT_MAX)))
    return cudaErrorInvalidValue;
  if (n_a == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto type) {
    return lse<typename decltype(type)::type>(A, B, inv_a, inv_b, targets, lse_out, loss, col_other, col_target, n_a,
                                              n_b, d, stride_a, stride_ad, stride_b, stride_bd, scale, shift, stream);
  });
}

extern "C" int mmkd_contrastive_grad(int dtype, const void* A, const void* B, const float* inv_a, const float* inv_b,
                                     const float* lse_a, const float* g_a, const int64_t* t_a, const float* tg_a,
                                     const float* lse_b, const float* g_b, const int64_t* t_b, const float* tg_b,
                                     float* dA, int64_t n_a, int64_t n_b,
                                     int64_t d, int64_t stride_a, int64_t stride_ad, int64_t stride_b,
                                     int64_t stride_bd, float scale, cudaStream_t stream) {
  // A side without rows has no term, whatever its pointers: an empty tensor may or may not have
  // storage (a DDP rank without student rows passes its empty row term to the teacher's gradient).
  if (n_a == 0) lse_a = g_a = tg_a = nullptr, t_a = nullptr;
  if (n_b == 0) lse_b = g_b = tg_b = nullptr, t_b = nullptr;
  if (!valid_dtype(dtype) || !valid_sizes(n_a, n_b, d) || !consistent(lse_a, g_a, t_a, tg_a) ||
      !consistent(lse_b, g_b, t_b, tg_b))
    return cudaErrorInvalidValue;
  if (n_a == 0 || d == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto type) {
    return grad<typename decltype(type)::type>(A, B, inv_a, inv_b, lse_a, g_a, t_a, tg_a, lse_b, g_b, t_b, tg_b, dA,
                                               n_a, n_b, d, stride_a, stride_ad, stride_b, stride_bd, scale, stream);
  });
}

extern "C" int mmkd_contrastive_lse_grad(int dtype, const void* A, const void* B, const float* inv_a,
                                         const float* inv_b, const int64_t* targets, float* lse_out, float* loss,
                                         float* dA, int64_t n_a, int64_t n_b, int64_t d, int64_t stride_a,
                                         int64_t stride_ad, int64_t stride_b, int64_t stride_bd, float scale,
                                         float shift, cudaStream_t stream) {
  // e^{z − shift} reaches e^{−2·shift}: every product operand holds it (float16's in TF32).
  if (!valid_dtype(dtype) || !valid_sizes(n_a, n_b, d) || !(shift >= 0.0f) || shift > MMKD_FIXED_SHIFT_MAX)
    return cudaErrorInvalidValue;
  if (n_a == 0) return cudaSuccess;
  if (d == 0)
    return mmkd_contrastive_lse(dtype, A, B, inv_a, inv_b, targets, lse_out, loss, nullptr, nullptr, n_a, n_b, d,
                                stride_a, stride_ad, stride_b, stride_bd, scale, 0.0f, stream);
  return with_dtype(dtype, [&](auto type) {
    return lse_grad<typename decltype(type)::type>(A, B, inv_a, inv_b, targets, lse_out, loss, dA, n_a, n_b, d,
                                                   stride_a, stride_ad, stride_b, stride_bd, scale, shift, stream);
  });
}
