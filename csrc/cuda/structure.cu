// CUDA kernels of the structure loss, tile algorithm (DESIGN §1.2), a port of
// mmkd_kernels/triton/structure.py: tiles of G^S = ŜŜᵀ and G^T = T̂T̂ᵀ are computed side by side and
// never stored; the diagonal (i, i) is left out. Kinds (a template parameter): 0 mse, 1 pearson, 2 kl,
// 3 kl in its centred form.
//
// - rows_kernel: for a block of 64 rows, one pass over the 64-column tiles with per-row statistics
//   in registers (warp w owns rows w·8 .. w·8 + 7): mse the sum of squared differences; pearson
//   means, centered sums of squares and cross-sums merged tile by tile with Chan et al.'s formulas
//   (each tile centered on its own means); kl two online softmaxes and the running Σ P·(a − b);
//   kl centred (MMKD_KL_CENTRED) the sums Z = Σ w, μ = Σ w d / Z and V = Σ w φ(d − μ), with
//   w = e^{a − |scale|} (a = scale·G^T), d = scale·(G^S − G^T) and φ(x) = e^x − 1 − x ≥ 0, so that
//   KL = log1p(V / Z): terms ≥ 0, where Σ P·(a − b) − lse_a + lse_b cancels to far less than its
//   terms when the student is close to its teacher. Each tile's sums are taken about its own μ and
//   merged as Chan et al. merge variances: about the merged μ', a part with mean μ₁ has
//   V₁' = e^{μ₁ − μ'} V₁ + Z₁ φ(μ₁ − μ'). As mmkd_kernels/triton/structure.py.
//   Writes the per-row losses and the statistics the gradient needs ([row_count, 5]).
// - grad_kernel: recomputes the tiles and turns the per-row statistics into dG of one side (student
//   or teacher). For a block of 64 rows j (of all n) it accumulates Σ_i (dG_ji + dG_ij) X̂_i: G is
//   symmetric, so one tile of rows j × columns i gives the row term (row j's coefficients) and the
//   column term (row i's), each tile is computed once per gradient, and no atomics. A block holds
//   CHUNKS 64-wide chunks of the output's D (tiles.cuh: 2 for D ≤ 128, else 6), so the tiles are
//   computed once per 64 · CHUNKS output columns (once at D = 384).
//
// Tiles 64 × 64, D in chunks of 32, 256 threads; float32 by FMA, float16/bfloat16 by WMMA tensor
// cores (float16's gradient products in TF32: tiles.cuh Traits), float32 accumulation. Dynamic
// shared memory (float32 / float16 / bfloat16 inputs): rows 51.5 / 45 / 45 KiB, grad
// 71.5 / 71.5 / 56.5 KiB (opted in above 48 KiB).
//
// Validation: compiled with nvcc -arch=sm_90 and run on the CPU under emulation/ against the chunked
// backend (tests/test_cuda_sources.py); a run on a GPU is still owed.

#include <math.h>

#include "launchers.h"
#include "tiles.cuh"

namespace {

using namespace mmkd_tiles;

// reference.EPS: the pearson denominator is max(√var_s·√var_t, eps), each root first, since
// var_s·var_t overflows float for variances past 1.8e19 (unnormalized rows of 3e4).
constexpr float kEps = 1e-8f;

// φ(x) = e^x − 1 − x to a few ulps of φ: its Taylor series Σ_{k=2..10} x^k / k! where |x| < 1/2
// (e^x − 1 − x would cancel there), the difference elsewhere (where it is ≥ 0.1 and e^x's own
// rounding is small next to it; expf is a smaller routine than expm1f, and registers are short).
// As csrc/cpu/common.h expm1_minus_x.
__device__ __forceinline__ float expm1_minus_x(float x) {
  if (fabsf(x) >= 0.5f) return (expf(x) - 1.0f) - x;
  float series = 1.0f / 3628800.0f;
  series = series * x + 1.0f / 362880.0f;
  series = series * x + 1.0f / 40320.0f;
  series = series * x + 1.0f / 5040.0f;
  series = series * x + 1.0f / 720.0f;
  series = series * x + 1.0f / 120.0f;
  series = series * x + 1.0f / 24.0f;
  series = series * x + 1.0f / 6.0f;
  series = series * x + 0.5f;
  return x * x * series;
}

// e^x − 1 to a few ulps: x + φ(x) where |x| < 1/2, e^x − 1 elsewhere (common.h fast_expm1).
__device__ __forceinline__ float expm1_small(float x) {
  return fabsf(x) < 0.5f ? x + expm1_minus_x(x) : expf(x) - 1.0f;
}

// Shared memory of rows_kernel: both similarity tiles, the D chunks, the inverse norms of the tile's
// rows (s, t) and columns (s, t).
template <typename T>
struct RowsLayout {
  static constexpr size_t kGs = 0;
  static constexpr size_t kGt = kGs + kTileBytes;
  static constexpr size_t kStage = kGt + kTileBytes;
  static constexpr size_t kEdges = kStage + kStageBytes<T>;
  static constexpr size_t kTotal = kEdges + round_up(4 * kBlock * sizeof(float));
  static_assert(kTotal <= kMaxSharedBytes, "shared memory");
};

template <typename T, int KIND>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* __restrict__ S, const T* __restrict__ Tm, const float* __restrict__ inv_s,
                const float* __restrict__ inv_t, float* __restrict__ loss, float* __restrict__ stats, int64_t n,
                int64_t row_start, int64_t row_count, int64_t ds, int64_t dt, int64_t s_row, int64_t s_col,
                int64_t t_row, int64_t t_col, float scale) {
  unsigned char* smem = dynamic_smem();
  using L = RowsLayout<T>;
  float* Gs = reinterpret_cast<float*>(smem + L::kGs);
  float* Gt = reinterpret_cast<float*>(smem + L::kGt);
  T* stage = reinterpret_cast<T*>(smem + L::kStage);
  float* inv_sa = reinterpret_cast<float*>(smem + L::kEdges);
  float* inv_ta = inv_sa + kBlock;
  float* inv_sb = inv_ta + kBlock;
  float* inv_tb = inv_sb + kBlock;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t local0 = static_cast<int64_t>(blockIdx.x) * kBlock;  // first row of the block, from row_start
  const int64_t a_first = row_start + local0;
  const int64_t a_end = row_start + row_count;
  if (tid < kBlock) {
    const bool in = local0 + tid < row_count;
    inv_sa[tid] = in ? inv_s[a_first + tid] : 0.0f;
    inv_ta[tid] = in ? inv_t[a_first + tid] : 0.0f;
  }

  // Running statistics of the warp's rows (every lane the same values); their meaning by KIND:
  // mse r0 Σ(gs − gt)²; pearson count, r0 mean_s, r1 mean_t, r2 M2_s, r3 M2_t, r4 C;
  // kl (a = scale·G^T, b = scale·G^S) max_a, max_b, r0 Σexp(a − max_a), r1 Σexp(b − max_b),
  // r2 Σexp(a − max_a)(a − b); kl centred r0 Z, r1 μ, r2 V.
  float count[kRowsPerWarp], r0[kRowsPerWarp], r1[kRowsPerWarp], r2[kRowsPerWarp], r3[kRowsPerWarp],
      r4[kRowsPerWarp], max_a[kRowsPerWarp], max_b[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    count[r] = r0[r] = r1[r] = r2[r] = r3[r] = r4[r] = 0.0f;
    max_a[r] = max_b[r] = -INFINITY;
  }

  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    __syncthreads();  // the previous tile's readers of Gs, Gt and the column vectors are done
    if (tid < kBlock) {
      const bool in = b0 + tid < n;
      inv_sb[tid] = in ? inv_s[b0 + tid] : 0.0f;
      inv_tb[tid] = in ? inv_t[b0 + tid] : 0.0f;
    }
    dot_tile<T>(S, a_first, a_end, s_row, s_col, S, b0, n, s_row, s_col, ds, stage, Gs);
    dot_tile<T>(Tm, a_first, a_end, t_row, t_col, Tm, b0, n, t_row, t_col, dt, stage, Gt);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = warp * kRowsPerWarp + r;
      const bool row_in = local0 + i < row_count;
      bool valid[2];
      float gs[2], gt[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        valid[h] = row_in && b0 + j < n && b0 + j != a_first + i;
        gs[h] = Gs[i * kTilePitch + j] * (inv_sa[i] * inv_sb[j]);
        gt[h] = Gt[i * kTilePitch + j] * (inv_ta[i] * inv_tb[j]);
      }
      if constexpr (KIND == MMKD_MSE) {
        const float d0 = valid[0] ? gs[0] - gt[0] : 0.0f;
        const float d1 = valid[1] ? gs[1] - gt[1] : 0.0f;
        r0[r] += warp_sum(d0 * d0 + d1 * d1);
      } else if constexpr (KIND == MMKD_PEARSON) {
        // Chan et al.: merge this tile's statistics (centered on the tile's own means).
        const float tile_count = warp_sum(static_cast<float>(valid[0]) + static_cast<float>(valid[1]));
        const float safe = fmaxf(tile_count, 1.0f);
        const float tile_mean_s =
            warp_sum((valid[0] ? gs[0] : 0.0f) + (valid[1] ? gs[1] : 0.0f)) / safe;
        const float tile_mean_t =
            warp_sum((valid[0] ? gt[0] : 0.0f) + (valid[1] ? gt[1] : 0.0f)) / safe;
        float cs[2], ct[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          cs[h] = valid[h] ? gs[h] - tile_mean_s : 0.0f;
          ct[h] = valid[h] ? gt[h] - tile_mean_t : 0.0f;
        }
        const float m2_s = warp_sum(cs[0] * cs[0] + cs[1] * cs[1]);
        const float m2_t = warp_sum(ct[0] * ct[0] + ct[1] * ct[1]);
        const float c_st = warp_sum(cs[0] * ct[0] + cs[1] * ct[1]);
        const float total = count[r] + tile_count;
        const float weight = total > 0.0f ? tile_count / fmaxf(total, 1.0f) : 0.0f;
        const float delta_s = tile_mean_s - r0[r];
        const float delta_t = tile_mean_t - r1[r];
        r0[r] += delta_s * weight;
        r1[r] += delta_t * weight;
        r2[r] += m2_s + delta_s * delta_s * count[r] * weight;
        r3[r] += m2_t + delta_t * delta_t * count[r] * weight;
        r4[r] += c_st + delta_s * delta_t * count[r] * weight;
        count[r] = total;
      } else if constexpr (KIND == MMKD_KL_CENTRED) {
        // |a| ≤ |scale|: the weights need no running max.
        const float shift = fabsf(scale);
        float w[2], d[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          d[h] = valid[h] ? (gs[h] - gt[h]) * scale : 0.0f;
          w[h] = valid[h] ? expf(gt[h] * scale - shift) : 0.0f;
        }
        const float tile_z = warp_sum(w[0] + w[1]);
        // The mean about the tile's largest d: exact when the row has one column (n = 2, whose loss
        // is then exactly 0), where Σ w d / Σ w would round.
        float pivot = warp_max(fmaxf(valid[0] ? d[0] : -INFINITY, valid[1] ? d[1] : -INFINITY));
        pivot = pivot == -INFINITY ? 0.0f : pivot;
        const float tile_mu =
            pivot + warp_sum(w[0] * (d[0] - pivot) + w[1] * (d[1] - pivot)) / (tile_z > 0.0f ? tile_z : 1.0f);
        float v[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) v[h] = valid[h] ? w[h] * expm1_minus_x(d[h] - tile_mu) : 0.0f;
        const float tile_v = warp_sum(v[0] + v[1]);
        const float total = r0[r] + tile_z;
        const float mu = r1[r] + (tile_mu - r1[r]) * (tile_z / (total > 0.0f ? total : 1.0f));
        const float old_part = r1[r] - mu;
        const float tile_part = tile_mu - mu;
        r2[r] = expf(old_part) * r2[r] + r0[r] * expm1_minus_x(old_part) + expf(tile_part) * tile_v +
                tile_z * expm1_minus_x(tile_part);
        r0[r] = total;
        r1[r] = mu;
      } else {
        float a[2], b[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a[h] = valid[h] ? gt[h] * scale : -INFINITY;
          b[h] = valid[h] ? gs[h] * scale : -INFINITY;
        }
        const float new_a = fmaxf(max_a[r], warp_max(fmaxf(a[0], a[1])));
        const float new_b = fmaxf(max_b[r], warp_max(fmaxf(b[0], b[1])));
        const float safe_a = new_a == -INFINITY ? 0.0f : new_a;
        const float safe_b = new_b == -INFINITY ? 0.0f : new_b;
        const float alpha = expf(max_a[r] - safe_a);
        float e[2], e_ab[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          e[h] = expf(a[h] - safe_a);
          e_ab[h] = valid[h] ? e[h] * (a[h] - b[h]) : 0.0f;
        }
        r0[r] = r0[r] * alpha + warp_sum(e[0] + e[1]);
        r2[r] = r2[r] * alpha + warp_sum(e_ab[0] + e_ab[1]);
        r1[r] = r1[r] * expf(max_b[r] - safe_b) + warp_sum(expf(b[0] - safe_b) + expf(b[1] - safe_b));
        max_a[r] = new_a;
        max_b[r] = new_b;
      }
    }
  }

  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t local = local0 + warp * kRowsPerWarp + r;
      if (local >= row_count) continue;
      float row_loss, s[MMKD_STRUCTURE_STATS] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      if constexpr (KIND == MMKD_MSE) {
        row_loss = r0[r] / static_cast<float>(n - 1);
      } else if constexpr (KIND == MMKD_PEARSON) {
        row_loss = 1.0f - r4[r] / fmaxf(sqrtf(r2[r]) * sqrtf(r3[r]), kEps);
        s[0] = r0[r];
        s[1] = r1[r];
        s[2] = r2[r];
        s[3] = r3[r];
        s[4] = r4[r];
      } else if constexpr (KIND == MMKD_KL_CENTRED) {
        row_loss = log1pf(r2[r] / r0[r]);
        s[0] = fabsf(scale) + logf(r0[r]);
        s[1] = r1[r];
        s[2] = row_loss;
      } else {
        // Differences first: with one column, (a − b) − ((max_a − max_b) + 0) is exactly 0.
        row_loss = r2[r] / r0[r] - ((max_a[r] - max_b[r]) + (logf(r0[r]) - logf(r1[r])));
        s[0] = max_a[r] + logf(r0[r]);
        s[1] = max_b[r] + logf(r1[r]);
        s[2] = row_loss;
      }
      loss[local] = row_loss;
#pragma unroll
      for (int k = 0; k < MMKD_STRUCTURE_STATS; ++k) stats[local * MMKD_STRUCTURE_STATS + k] = s[k];
    }
  }
}

// The per-row coefficients that turn a tile's (gs, gt) into dG of one side (see dg below), from a
// computed row's statistics and its loss weight g.
template <int KIND>
__device__ void coefficients(const float* st, float g, int64_t n, float scale, bool student, float k[4]) {
  k[0] = k[1] = k[2] = k[3] = 0.0f;
  if constexpr (KIND == MMKD_MSE) {
    k[0] = 2.0f * g / static_cast<float>(n - 1);  // dG^S = (gs − gt) · k0, dG^T its negative
  } else if constexpr (KIND == MMKD_PEARSON) {
    // loss_i = 1 − r_i: k0 mean_s, k1 mean_t, k2 g_r / denom, k3 the coefficient of the own side.
    const float var_s = st[2], var_t = st[3], cov = st[4];
    const float root = sqrtf(var_s) * sqrtf(var_t);
    const float denom = fmaxf(root, kEps);
    const float r = cov / denom;
    const float g_r = -g;
    const float var_own = student ? var_s : var_t;
    k[0] = st[0];
    k[1] = st[1];
    k[2] = g_r / denom;
    k[3] = root > kEps ? g_r * r / var_own : 0.0f;
  } else {
    // k0 lse_t, k1 lse_s (centred: μ), k2 the row's KL, k3 g · scale.
    k[0] = st[0];
    k[1] = st[1];
    k[2] = st[2];
    k[3] = g * scale;
  }
}

// dG of one side at a pair of G^S = gs and G^T = gt, by the coefficients of the pair's row.
template <int KIND>
__device__ __forceinline__ float dg(float gs, float gt, float k0, float k1, float k2, float k3, float scale,
                                    bool student) {
  if constexpr (KIND == MMKD_MSE) {
    const float d = (gs - gt) * k0;
    return student ? d : -d;
  } else if constexpr (KIND == MMKD_PEARSON) {
    const float cs = gs - k0;
    const float ct = gt - k1;
    return student ? ct * k2 - cs * k3 : cs * k2 - ct * k3;
  } else if constexpr (KIND == MMKD_KL_CENTRED) {
    // q − p = p (e^{x − kl} − 1) and ∂kl/∂a = −p x for x = d − μ: no difference of near numbers.
    const float p = expf(gt * scale - k0);
    const float x = (gs - gt) * scale - k1;
    return student ? (p * expm1_small(x - k2)) * k3 : -(p * x) * k3;
  } else {
    const float log_p = gt * scale - k0;
    const float log_q = gs * scale - k1;
    const float p = expf(log_p);
    return student ? (expf(log_q) - p) * k3 : (p * ((log_p - log_q) - k2)) * k3;
  }
}

// A block of 64 rows' vectors in shared memory: inverse norms of both sides, the coefficients k0..k3
// and whether each is a computed row (1 or 0).
struct RowVectors {
  float* inv_s;
  float* inv_t;
  float* k[4];
  float* computed;
  static constexpr int kCount = 7;  // vectors of kBlock floats
  __device__ RowVectors(float* base) : inv_s(base), inv_t(base + kBlock), computed(base + 6 * kBlock) {
#pragma unroll
    for (int c = 0; c < 4; ++c) k[c] = base + (2 + c) * kBlock;
  }
  // Entry r for row `first + r` (0 and not computed past `end`); threads 0 .. kBlock − 1 call it.
  template <int KIND>
  __device__ void load(int r, int64_t first, int64_t end, const float* inv_s_g, const float* inv_t_g,
                       const float* stats, const float* grad, int64_t n, int64_t row_start, int64_t row_count,
                       float scale, bool student) const {
    const int64_t row = first + r;
    const bool in = row < end;
    const bool is_computed = in && row >= row_start && row < row_start + row_count;
    inv_s[r] = in ? inv_s_g[row] : 0.0f;
    inv_t[r] = in ? inv_t_g[row] : 0.0f;
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (is_computed) {
      const int64_t local = row - row_start;
      coefficients<KIND>(stats + local * MMKD_STRUCTURE_STATS, grad[local], n, scale, student, c);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) k[q][r] = c[q];
    computed[r] = is_computed ? 1.0f : 0.0f;
  }
};

// Shared memory of grad_kernel: both similarity tiles, the dG operand tile, the D chunks sharing a
// region with the X tile of the product, and the vectors of the block's rows j and of the tile's
// rows i.
template <typename T>
struct GradLayout {
  static constexpr size_t kGs = 0;
  static constexpr size_t kGt = kGs + kTileBytes;
  static constexpr size_t kP = kGt + kTileBytes;
  static constexpr size_t kStage = kP + kOperandBytes<T>;
  static constexpr size_t kRowsJ = kStage + kStageOrOperandBytes<T>;
  static constexpr size_t kRowsI = kRowsJ + round_up(RowVectors::kCount * kBlock * sizeof(float));
  static constexpr size_t kTotal = kRowsI + round_up(RowVectors::kCount * kBlock * sizeof(float));
  static_assert(kTotal <= kMaxSharedBytes, "shared memory");
};

// DX[j, chunks blockIdx.y · CHUNKS ..] = Σ_i (dG_ji + dG_ij) X̂_i for the block's 64 rows j (of all n),
// X̂ of SIDE. G = X̂X̂ᵀ sends a computed row i's dG_ij to X̂_i (the row term) and to X̂_j (the column
// term). G is symmetric, so the tile of rows j × columns i serves both terms of row j: its rows'
// coefficients give dG_ji, and with the columns' coefficients the same values give dG_ij. Each tile
// is computed once, and no atomics. A block without computed rows only has column terms: it loops
// over the computed rows i alone.
template <typename T, int KIND, int CHUNKS>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* __restrict__ S, const T* __restrict__ Tm, const float* __restrict__ inv_s,
                const float* __restrict__ inv_t, const float* __restrict__ stats, const float* __restrict__ grad,
                float* __restrict__ dX, int64_t n, int64_t row_start, int64_t row_count, int64_t ds, int64_t dt,
                int64_t s_row, int64_t s_col, int64_t t_row, int64_t t_col, float scale, int side) {
  unsigned char* smem = dynamic_smem();
  using L = GradLayout<T>;
  constexpr int OP = Traits<T>::kOperandPitch;
  float* Gs = reinterpret_cast<float*>(smem + L::kGs);
  float* Gt = reinterpret_cast<float*>(smem + L::kGt);
  Operand<T>* Pm = reinterpret_cast<Operand<T>*>(smem + L::kP);
  T* stage = reinterpret_cast<T*>(smem + L::kStage);  // dot_tile's chunks, then
  Operand<T>* Xs = reinterpret_cast<Operand<T>*>(stage);  // the X tile of dG·X
  const RowVectors rj(reinterpret_cast<float*>(smem + L::kRowsJ));
  const RowVectors ri(reinterpret_cast<float*>(smem + L::kRowsI));

  const bool student = side == MMKD_STUDENT;  // uniform over the grid
  const T* X = student ? S : Tm;
  const int64_t dx = student ? ds : dt;
  const int64_t x_row = student ? s_row : t_row;
  const int64_t x_col = student ? s_col : t_col;
  const float* inv_xi = student ? ri.inv_s : ri.inv_t;

  const int tid = threadIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t do_first = static_cast<int64_t>(blockIdx.y) * kBlock * CHUNKS;
  const int64_t computed_end = row_start + row_count;
  // Uniform over the block; no computed rows (row_count == 0) never stream every column for nothing.
  const bool has_rows = row_count > 0 && j0 < computed_end && j0 + kBlock > row_start;
  const int64_t lo = has_rows ? 0 : row_start;
  const int64_t hi = has_rows ? n : computed_end;
  if (tid < kBlock) {
    rj.load<KIND>(tid, j0, n, inv_s, inv_t, stats, grad, n, row_start, row_count, scale, student);
  }

  OutAccs<T, CHUNKS> accs;
  accs.zero();
  for (int64_t i0 = lo; i0 < hi; i0 += kBlock) {
    __syncthreads();  // the previous tile's readers of Gs, Gt, Pm, the X tile and ri are done
    if (tid < kBlock) {
      ri.load<KIND>(tid, i0, hi, inv_s, inv_t, stats, grad, n, row_start, row_count, scale, student);
    }
    dot_tile<T>(S, j0, n, s_row, s_col, S, i0, hi, s_row, s_col, ds, stage, Gs);
    dot_tile<T>(Tm, j0, n, t_row, t_col, Tm, i0, hi, t_row, t_col, dt, stage, Gt);
#pragma unroll 4
    for (int e = tid; e < kBlock * kBlock; e += kThreads) {
      const int jl = e / kBlock;
      const int il = e % kBlock;
      float d = 0.0f;
      if (j0 + jl < n && i0 + il < hi && j0 + jl != i0 + il) {
        const float gs = Gs[jl * kTilePitch + il] * (rj.inv_s[jl] * ri.inv_s[il]);
        const float gt = Gt[jl * kTilePitch + il] * (rj.inv_t[jl] * ri.inv_t[il]);
        // The row term (dG_ji, row j's coefficients) and the column term (dG_ij, row i's).
        if (rj.computed[jl] != 0.0f) {
          d += dg<KIND>(gs, gt, rj.k[0][jl], rj.k[1][jl], rj.k[2][jl], rj.k[3][jl], scale, student);
        }
        if (ri.computed[il] != 0.0f) {
          d += dg<KIND>(gs, gt, ri.k[0][il], ri.k[1][il], ri.k[2][il], ri.k[3][il], scale, student);
        }
      }
      Pm[jl * OP + il] = Traits<T>::to_operand(d * inv_xi[il]);
    }
    accumulate_px_chunks<T, CHUNKS>(Pm, X, i0, hi, x_row, x_col, do_first, dx, Xs, accs);
  }
  __syncthreads();  // no thread reads Gs any more: store_out may stage in it
  store_out_chunks<T, CHUNKS>(accs, dX, j0, n, do_first, dx, Gs);
}

// A dtype and a kind the kernels have, at a scale the kind allows (NaN refused for the centred kl).
bool valid_dtype_and_kind(int dtype, int kind, float scale) {
  return valid_dtype(dtype) &&
         (kind == MMKD_MSE || kind == MMKD_PEARSON || kind == MMKD_KL ||
          (kind == MMKD_KL_CENTRED && fabsf(scale) <= MMKD_KL_CENTRED_MAX_SCALE));
}

bool valid_rows(int64_t n, int64_t row_start, int64_t row_count, int64_t ds, int64_t dt) {
  return n >= 0 && ds >= 0 && dt >= 0 && row_start >= 0 && row_count >= 0 && row_start <= n &&
         row_count <= n - row_start;
}

template <typename T, int KIND>
int rows(const void* S, const void* Tm, const float* inv_s, const float* inv_t, float* loss, float* stats, int64_t n,
         int64_t row_start, int64_t row_count, int64_t ds, int64_t dt, int64_t s_row, int64_t s_col, int64_t t_row,
         int64_t t_col, float scale, cudaStream_t stream) {
  const unsigned int blocks = blocks_of(row_count, 0x7fffffff);
  if (blocks == 0) return cudaErrorInvalidValue;
  return launch(rows_kernel<T, KIND>, dim3(blocks), RowsLayout<T>::kTotal, stream, static_cast<const T*>(S),
                static_cast<const T*>(Tm), inv_s, inv_t, loss, stats, n, row_start, row_count, ds, dt, s_row, s_col,
                t_row, t_col, scale);
}

template <typename T, int KIND>
int grad(int side, const void* S, const void* Tm, const float* inv_s, const float* inv_t, const float* stats,
         const float* grad_weights, float* dX, int64_t n, int64_t row_start, int64_t row_count, int64_t ds,
         int64_t dt, int64_t s_row, int64_t s_col, int64_t t_row, int64_t t_col, float scale, cudaStream_t stream) {
  const int64_t dx = side == MMKD_STUDENT ? ds : dt;
  return with_output_chunks(dx, [&](auto chunks) -> int {
    constexpr int CHUNKS = decltype(chunks)::value;
    dim3 grid;
    if (!gradient_grid(n, dx, CHUNKS, &grid)) return cudaErrorInvalidValue;
    return launch(grad_kernel<T, KIND, CHUNKS>, grid, GradLayout<T>::kTotal, stream,
                  static_cast<const T*>(S), static_cast<const T*>(Tm), inv_s, inv_t, stats, grad_weights, dX, n,
                  row_start, row_count, ds, dt, s_row, s_col, t_row, t_col, scale, side);
  });
}

template <typename T>
int rows_of_kind(int kind, const void* S, const void* Tm, const float* inv_s, const float* inv_t, float* loss,
                 float* stats, int64_t n, int64_t row_start, int64_t row_count, int64_t ds, int64_t dt, int64_t s_row,
                 int64_t s_col, int64_t t_row, int64_t t_col, float scale, cudaStream_t stream) {
  switch (kind) {
    case MMKD_MSE:
      return rows<T, MMKD_MSE>(S, Tm, inv_s, inv_t, loss, stats, n, row_start, row_count, ds, dt, s_row, s_col,
                               t_row, t_col, scale, stream);
    case MMKD_PEARSON:
      return rows<T, MMKD_PEARSON>(S, Tm, inv_s, inv_t, loss, stats, n, row_start, row_count, ds, dt, s_row, s_col,
                                   t_row, t_col, scale, stream);
    case MMKD_KL:
      return rows<T, MMKD_KL>(S, Tm, inv_s, inv_t, loss, stats, n, row_start, row_count, ds, dt, s_row, s_col,
                              t_row, t_col, scale, stream);
    case MMKD_KL_CENTRED:
      return rows<T, MMKD_KL_CENTRED>(S, Tm, inv_s, inv_t, loss, stats, n, row_start, row_count, ds, dt, s_row,
                                      s_col, t_row, t_col, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
int grad_of_kind(int kind, int side, const void* S, const void* Tm, const float* inv_s, const float* inv_t,
                 const float* stats, const float* grad_weights, float* dX, int64_t n, int64_t row_start,
                 int64_t row_count, int64_t ds, int64_t dt, int64_t s_row, int64_t s_col, int64_t t_row,
                 int64_t t_col, float scale, cudaStream_t stream) {
  switch (kind) {
    case MMKD_MSE:
      return grad<T, MMKD_MSE>(side, S, Tm, inv_s, inv_t, stats, grad_weights, dX, n, row_start, row_count, ds, dt,
                               s_row, s_col, t_row, t_col, scale, stream);
    case MMKD_PEARSON:
      return grad<T, MMKD_PEARSON>(side, S, Tm, inv_s, inv_t, stats, grad_weights, dX, n, row_start, row_count, ds,
                                   dt, s_row, s_col, t_row, t_col, scale, stream);
    case MMKD_KL:
      return grad<T, MMKD_KL>(side, S, Tm, inv_s, inv_t, stats, grad_weights, dX, n, row_start, row_count, ds, dt,
                              s_row, s_col, t_row, t_col, scale, stream);
    case MMKD_KL_CENTRED:
      return grad<T, MMKD_KL_CENTRED>(side, S, Tm, inv_s, inv_t, stats, grad_weights, dX, n, row_start, row_count,
                                      ds, dt, s_row, s_col, t_row, t_col, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int mmkd_structure_rows(int dtype, int kind, const void* S, const void* T, const float* inv_s,
                                   const float* inv_t, float* loss, float* stats, int64_t n, int64_t row_start,
                                   int64_t row_count, int64_t ds, int64_t dt, int64_t stride_s, int64_t stride_sd,
                                   int64_t stride_t, int64_t stride_td, float scale, cudaStream_t stream) {
  if (!valid_dtype_and_kind(dtype, kind, scale) || !valid_rows(n, row_start, row_count, ds, dt))
    return cudaErrorInvalidValue;
  if (row_count == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto type) {
    return rows_of_kind<typename decltype(type)::type>(kind, S, T, inv_s, inv_t, loss, stats, n, row_start, row_count,
                                                       ds, dt, stride_s, stride_sd, stride_t, stride_td, scale, stream);
  });
}

extern "C" int mmkd_structure_grad(int dtype, int kind, int side, const void* S, const void* T, const float* inv_s,
                                   const float* inv_t, const float* stats, const float* grad, float* dx, int64_t n,
                                   int64_t row_start, int64_t row_count, int64_t ds, int64_t dt, int64_t stride_s,
                                   int64_t stride_sd, int64_t stride_t, int64_t stride_td, float scale,
                                   cudaStream_t stream) {
  if (!valid_dtype_and_kind(dtype, kind, scale) || !valid_rows(n, row_start, row_count, ds, dt) ||
      (side != MMKD_STUDENT && side != MMKD_TEACHER))
    return cudaErrorInvalidValue;
  if (n == 0 || (side == MMKD_STUDENT ? ds : dt) == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto type) {
    return grad_of_kind<typename decltype(type)::type>(kind, side, S, T, inv_s, inv_t, stats, grad, dx, n, row_start,
                                                       row_count, ds, dt, stride_s, stride_sd, stride_t, stride_td,
                                                       scale, stream);
  });
}
