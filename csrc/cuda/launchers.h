/* C launchers of the CUDA kernels of the native backend (contrastive.cu, structure.cu).
 *
 * Plain C prototypes: no torch here, so each .cu compiles alone with nvcc and the torch glue
 * (ops_cuda.cpp) only passes pointers, sizes and strides. The kernels are those of
 * mmkd_kernels/triton/contrastive.py and structure.py, which state the math; DESIGN.md §1 has it
 * in full.
 *
 * Common conventions:
 * - dtype: enum mmkd_dtype, the dtype of the input matrices (one dtype for all inputs of a call).
 *   Inverse norms, log-sum-exps, weights, statistics and every output are float32; indices int64.
 * - Input matrices are row-major views with explicit strides in elements: element (r, c) of A is
 *   at A[r * stride_a + c * stride_ad]. They need not be contiguous; outputs are contiguous.
 * - inv_*: per-row scales, 1 / max(‖row‖, 1e-8) for normalized rows (all ones when not
 *   normalizing); the kernels scale dot products by them instead of reading normalized copies.
 * - Each call enqueues its kernel on `stream` and returns a cudaError_t as int: cudaSuccess (0),
 *   cudaErrorInvalidValue for a bad dtype, kind, side, pointer set or size, or the launch's error.
 *   A call with nothing to compute (a zero row count or, for gradients, width) launches nothing.
 * - Needs sm_80 or newer (float16 and bfloat16 use tensor cores).
 */
#ifndef MMKD_CUDA_LAUNCHERS_H
#define MMKD_CUDA_LAUNCHERS_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The dtype of the input matrices. */
enum mmkd_dtype { MMKD_FLOAT32 = 0, MMKD_FLOAT16 = 1, MMKD_BFLOAT16 = 2 };

/* The kind of structure loss (DESIGN §1.2). MMKD_KL_CENTRED is kl in its centred form (structure.cu),
 * which keeps float32's digits when the student is close to its teacher; it assumes cosine
 * similarities (inv_s, inv_t the rows' inverse norms) and |scale| <= MMKD_KL_CENTRED_MAX_SCALE. */
enum mmkd_structure_kind { MMKD_MSE = 0, MMKD_PEARSON = 1, MMKD_KL = 2, MMKD_KL_CENTRED = 3 };

/* The largest |scale| of MMKD_KL_CENTRED: its weights e^{scale·G^T − |scale|} need no running max,
 * and its e^{d − μ} stay finite in float32 (|d − μ| <= 4 |scale|). As chunked.KL_CENTRED_MAX_SCALE. */
#define MMKD_KL_CENTRED_MAX_SCALE 20.0f

/* Which similarity matrix a structure gradient is of: the student's G^S = ŝŝᵀ or the teacher's. */
enum mmkd_structure_side { MMKD_STUDENT = 0, MMKD_TEACHER = 1 };

/* Per-row statistics of the structure loss saved for its gradient: float32 [row_count, 5]. */
#define MMKD_STRUCTURE_STATS 5

/* ---------------------------------------------------------------------------------------------
 * Contrastive loss, z[a, b] = scale · (A_a · B_b) · inv_a[a] · inv_b[b], never stored.
 * ------------------------------------------------------------------------------------------- */

/* The largest fixed shift the kernels take: e^{−2·40} is still a normal float32. */
#define MMKD_FIXED_SHIFT_MAX 40.0f

/* Online log-sum-exp over the rows of z.
 *   A (n_a, d), B (n_b, d) of `dtype`; inv_a (n_a,), inv_b (n_b,) float32; targets (n_a,) int64
 *   in [0, n_b).
 * Writes lse (n_a,) float32: lse[a] = log Σ_b exp z[a, b], and loss (n_a,) float32:
 * loss[a] = lse[a] − z[a, targets[a]], computed as log1p(Σ_{b≠t} e^{z_b − z_t}) while the target
 * dominates, so that a nearly aligned pair's small loss keeps its digits.
 * Run on (q, k) it gives the row statistics; on (k, q) with targets = arange, the column ones.
 * Or, in the same pass, for the symmetric loss (n_a = n_b) where every |z[a, b]| ≤ shift ≤
 * MMKD_FIXED_SHIFT_MAX (normalized rows: shift = |scale|): with col_other and col_target (n_b,)
 * float32 (both or neither; col_other zeroed by the caller), adds Σ_{a≠b} e^{z[a, b] − shift} into
 * col_other[b] (atomically, in no fixed order) and writes col_target[b] = z[b, b]. shift is read
 * only then. */
int mmkd_contrastive_lse(int dtype, const void* A, const void* B, const float* inv_a, const float* inv_b,
                         const int64_t* targets, float* lse, float* loss, float* col_other, float* col_target,
                         int64_t n_a, int64_t n_b, int64_t d, int64_t stride_a, int64_t stride_ad, int64_t stride_b,
                         int64_t stride_bd, float scale, float shift, cudaStream_t stream);

/* mmkd_contrastive_lse and the row term of mmkd_contrastive_grad with g = 1 (the gradient of
 * Σ_a loss[a]) in one pass over z, for inputs whose every |z[a, b]| ≤ shift ≤ MMKD_FIXED_SHIFT_MAX
 * (normalized rows: shift = |scale|). The sums are taken as Σ e^{z − shift}: no running max, so
 * the gradient's accumulator needs no rescaling.
 *   dtype: any (float16's weights reach e^{−2·shift}: its products take them in TF32).
 *   A, B, inv_a, inv_b, targets as for mmkd_contrastive_lse.
 * Writes lse and loss (n_a,) as mmkd_contrastive_lse does, and dA (n_a, d) float32, contiguous:
 * dA[a, :] = scale · Σ_b (softmax_b(z[a, :]) − [b = targets[a]]) · inv_b[b] · B_b, the target's
 * term expm1(−loss[a]) (exact where the softmax rounds to 1). */
int mmkd_contrastive_lse_grad(int dtype, const void* A, const void* B, const float* inv_a, const float* inv_b,
                              const int64_t* targets, float* lse, float* loss, float* dA, int64_t n_a, int64_t n_b,
                              int64_t d, int64_t stride_a, int64_t stride_ad, int64_t stride_b, int64_t stride_bd,
                              float scale, float shift, cudaStream_t stream);

/* Gradient with respect to the scaled rows Â_a = inv_a[a] · A_a:
 *   dA[a, :] = scale · Σ_b dz[a, b] · inv_b[b] · B_b,
 *   dz[a, b] = g_a[a] (exp(z[a, b] − lse_a[a]) − [b = t_a[a]])      (row term)
 *            + g_b[b] (exp(z[a, b] − lse_b[b]) − [a = t_b[b]])      (column term)
 *   where a target's term is tg_a[a] (tg_b[b]) instead: g·expm1(−loss), exact where the softmax
 *   rounds to 1 (the caller computes it from mmkd_contrastive_lse's loss).
 *   A, B, inv_a, inv_b as for mmkd_contrastive_lse. Row term: lse_a, g_a, tg_a (n_a,) float32, t_a
 *   (n_a,) int64; column term: lse_b, g_b, tg_b (n_b,) float32, t_b (n_b,) int64. A term whose four
 *   pointers are all NULL is off (mixing NULL and non-NULL in one term is an error).
 * Writes dA (n_a, d) float32, contiguous: the gradient of the normalized rows (the normalization's
 * own backward is the caller's). Run on (q, k) it gives dq̂, on (k, q) with the terms swapped dk̂:
 * row-parallel both ways, no atomics. */
int mmkd_contrastive_grad(int dtype, const void* A, const void* B, const float* inv_a, const float* inv_b,
                          const float* lse_a, const float* g_a, const int64_t* t_a, const float* tg_a,
                          const float* lse_b, const float* g_b, const int64_t* t_b, const float* tg_b, float* dA,
                          int64_t n_a, int64_t n_b, int64_t d,
                          int64_t stride_a, int64_t stride_ad, int64_t stride_b, int64_t stride_bd, float scale,
                          cudaStream_t stream);

/* ---------------------------------------------------------------------------------------------
 * Structure loss, tile algorithm: rows i in [row_start, row_start + row_count) of G^S and G^T
 * against all n columns j, pairs i = j left out. G^S[i, j] = (S_i · S_j) inv_s[i] inv_s[j],
 * G^T likewise with T. Common arguments:
 *   S (n, ds), T (n, dt) of `dtype` (the widths may differ); inv_s, inv_t (n,) float32;
 *   kind: enum mmkd_structure_kind; scale = 1 / temperature (kl only);
 *   0 <= row_start, 0 <= row_count, row_start + row_count <= n.
 * ------------------------------------------------------------------------------------------- */

/* Per-row losses and statistics. Writes loss (row_count,) float32, the loss of row row_start + r at
 * r, and stats (row_count, 5) float32, row r:
 *   mse     (0, 0, 0, 0, 0)
 *   pearson (mean_s, mean_t, var_s, var_t, cov): means and centered sums (not means) over j ≠ i
 *   kl      (lse_t, lse_s, kl, 0, 0): log-sum-exps over j ≠ i of scale·G^T and scale·G^S, and
 *           the row's KL(P ‖ Q) (= its loss)
 *   kl, centred (lse_t, μ, kl, 0, 0): μ = Σ_j p_j d_j, p the teacher's softmax, d = scale·(G^S − G^T). */
int mmkd_structure_rows(int dtype, int kind, const void* S, const void* T, const float* inv_s, const float* inv_t,
                        float* loss, float* stats, int64_t n, int64_t row_start, int64_t row_count, int64_t ds,
                        int64_t dt, int64_t stride_s, int64_t stride_sd, int64_t stride_t, int64_t stride_td,
                        float scale, cudaStream_t stream);

/* The gradient of Σ_r grad[r] · loss[r] with respect to the normalized rows X̂ of one side (X = S
 * for side MMKD_STUDENT, T for MMKD_TEACHER; its width dx = ds or dt), from the statistics of
 * mmkd_structure_rows (stats (row_count, 5), grad (row_count,) float32). With dG the gradient of
 * that side's similarity matrix on the computed rows (zero on the diagonal), G = X̂X̂ᵀ gives
 * dX̂ = dG X̂ (on the computed rows) + dGᵀ X̂ (on all rows).
 * Writes dx (n, dx) float32, contiguous: row j = Σ_i (dG[j, i] + dG[i, j]) X̂_i, each term where its
 * row of dG is a computed row (all zeros when row_count = 0). */
int mmkd_structure_grad(int dtype, int kind, int side, const void* S, const void* T, const float* inv_s,
                        const float* inv_t, const float* stats, const float* grad, float* dx, int64_t n,
                        int64_t row_start, int64_t row_count, int64_t ds, int64_t dt, int64_t stride_s,
                        int64_t stride_sd, int64_t stride_t, int64_t stride_td, float scale, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* MMKD_CUDA_LAUNCHERS_H */
