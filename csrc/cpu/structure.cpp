// The structure loss on CPU, tile algorithm (DESIGN §1.2): for each block of rows, both similarity
// blocks G^S = x̂_b x̂ᵀ and G^T = ŷ_b ŷᵀ through MKL's GEMM, then a fused per-row epilogue (the
// row is whole, so its statistics are exact two-pass sums) that writes the row's loss and, for a
// forward with gradients, turns the blocks into dG^S, dG^T in place. G = x̂x̂ᵀ sends dG to the
// block's rows (dG x̂) and to every column (dGᵀ x̂_b). Same math as mmkd_kernels/chunked.py _Tile.
// kl of every row (its centred form) instead takes each pair once, over the upper triangle
// (kl_upper_triangle) from N = 1024 on: nearly a quarter fewer FLOPs with gradients, half without.
#include "../ops.h"
#include "common.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace mmkd {
namespace cpu {
namespace {

enum class Kind { kMse, kPearson, kKl };

// kl takes its centred form for cosine similarities up to this |scale| (mmkd_kernels/chunked.py
// KL_CENTRED_MAX_SCALE): then |x| ≤ 4|scale| ≤ 80 and e^x is a normal float32.
constexpr double kKlCentredMaxScale = 20.0;

Kind parse_kind(c10::string_view kind) {
  if (kind == "mse") return Kind::kMse;
  if (kind == "pearson") return Kind::kPearson;
  TORCH_CHECK(kind == "kl", "kind must be 'mse', 'pearson' or 'kl', got '", std::string(kind), "'");
  return Kind::kKl;
}

// Row sums go through blocked_sum (common.h): a float32 row of N = 16K terms summed in order loses
// about sqrt(N)·eps, which took kl's loss past the 1e-5 tolerance at N = 4096.
template <typename scalar_t>
struct RowMath {
  scalar_t* gs;  // the row of G^S (n), becomes dG^S when gradients are wanted
  scalar_t* gt;  // the row of G^T (n), becomes dG^T
  int64_t n, diag;
  scalar_t scale;

  scalar_t mse(bool grad_s, bool grad_t) {
    const scalar_t others = scalar_t(n - 1);
    gs[diag] = gt[diag] = 0;
    scalar_t* s = gs;
    scalar_t* t = gt;
    const double sum = blocked_sum(0, n, [s, t](int64_t j) { return (s[j] - t[j]) * (s[j] - t[j]); });
    if (grad_s || grad_t) {
      const scalar_t c = scalar_t(2) / others;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t d = (gs[j] - gt[j]) * c;
        gs[j] = d;
        gt[j] = -d;
      }
    }
    return static_cast<scalar_t>(sum / others);
  }

  scalar_t pearson(bool grad_s, bool grad_t) {
    const scalar_t others = scalar_t(n - 1);
    scalar_t* s = gs;
    scalar_t* t = gt;
    const scalar_t mean_s = static_cast<scalar_t>(blocked_sum_except(n, diag, [s](int64_t j) { return s[j]; }) / others);
    const scalar_t mean_t = static_cast<scalar_t>(blocked_sum_except(n, diag, [t](int64_t j) { return t[j]; }) / others);
    gs[diag] = mean_s;  // centered to 0: the diagonal drops out of every sum below
    gt[diag] = mean_t;
    const scalar_t var_s = static_cast<scalar_t>(
        blocked_sum(0, n, [s, mean_s](int64_t j) { return (s[j] - mean_s) * (s[j] - mean_s); }));
    const scalar_t var_t = static_cast<scalar_t>(
        blocked_sum(0, n, [t, mean_t](int64_t j) { return (t[j] - mean_t) * (t[j] - mean_t); }));
    const scalar_t cov = static_cast<scalar_t>(
        blocked_sum(0, n, [s, t, mean_s, mean_t](int64_t j) { return (s[j] - mean_s) * (t[j] - mean_t); }));
    // max(√var_s·√var_t, eps): each root first, since var_s·var_t overflows float32 for
    // variances past 1.8e19 (unnormalized rows of 3e4).
    const scalar_t root = std::sqrt(var_s) * std::sqrt(var_t), eps = scalar_t(kEps);
    const scalar_t denom = root > eps ? root : eps;
    const scalar_t r = cov / denom;
    if (grad_s || grad_t) {
      const scalar_t g_r = -1;  // loss = 1 − r
      const bool unclamped = root > eps;
      const scalar_t inv_d = g_r / denom;
      const scalar_t coef_s = unclamped ? g_r * r / var_s : 0, coef_t = unclamped ? g_r * r / var_t : 0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t cs = gs[j] - mean_s, ct = gt[j] - mean_t;
        gs[j] = ct * inv_d - cs * coef_s;
        gt[j] = cs * inv_d - ct * coef_t;
      }
    }
    return 1 - r;
  }

  // KL(P ‖ Q) in its centred form (mmkd_kernels/chunked.py _Tile._kl_centred_terms states it):
  // with e_j = e^{a_j − max a} (p = e / Σe), d = b − a, μ = Σ p d and x = d − μ,
  //   KL = log1p(Σ_j p_j (e^{x_j} − 1 − x_j)),  dG^S = scale·p·expm1(x − KL),  dG^T = −scale·p·x,
  // sums of terms ≥ 0 and no difference of near numbers, where the form below loses the digits of
  // a small KL. Needs |x| ≤ 4|scale| ≤ 80 (cosine similarities; kKlCentredMaxScale). Three
  // exponentials per pair where the form below takes five.
  scalar_t kl_centred(bool grad_s, bool grad_t) {
    scalar_t* e = gt;  // a, then e
    scalar_t* x = gs;  // b, then d, then x
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      // d = scale·(b − a) from the similarities, not b·scale − a·scale: that rounds (or contracts
      // to an FMA) differently for a and b, so a student equal to its teacher got d ≠ 0.
      const scalar_t a = gt[j] * scale;
      gs[j] = (gs[j] - gt[j]) * scale;
      gt[j] = a;
    }
    gt[diag] = -std::numeric_limits<scalar_t>::infinity();
    gs[diag] = 0;
    scalar_t max_a = -std::numeric_limits<scalar_t>::infinity();
#pragma omp simd reduction(max : max_a)
    for (int64_t j = 0; j < n; ++j) max_a = e[j] > max_a ? e[j] : max_a;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) e[j] = fast_exp(e[j] - max_a);  // 0 on the diagonal
    const double sum_e = blocked_sum(0, n, [e](int64_t j) { return e[j]; });
    const scalar_t mu = static_cast<scalar_t>(blocked_sum(0, n, [e, x](int64_t j) { return e[j] * x[j]; }) / sum_e);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] -= mu;
    x[diag] = 0;
    const double spread = blocked_sum(0, n, [e, x](int64_t j) { return e[j] * expm1_minus_x(x[j]); }) / sum_e;
    const scalar_t kl = static_cast<scalar_t>(std::log1p(spread));
    if (grad_s || grad_t) {
      const scalar_t p_scale = static_cast<scalar_t>(scale / sum_e);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t p_scaled = e[j] * p_scale, x_j = x[j];  // gs is x, gt is e: read both first
        gs[j] = p_scaled * fast_expm1(x_j - kl);
        gt[j] = -p_scaled * x_j;
      }
    }
    return kl;
  }

  // KL(P ‖ Q) of the teacher's row softmax P (logits a = G^T/τ) to the student's Q (b = G^S/τ),
  // the diagonal left out; every pass a vectorized loop over the two ranges beside the diagonal.
  scalar_t kl(bool grad_s, bool grad_t) {
    // Scaled in place once: every later use reads the same rounded value (no multiply left for
    // the compiler to fuse differently).
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      gt[j] *= scale;
      gs[j] *= scale;
    }
    gs[diag] = gt[diag] = 0;
    scalar_t* a = gt;
    scalar_t* b = gs;
    // A NaN never wins these maxima, but it reaches the sums below through exp(NaN − max).
    scalar_t max_a = -std::numeric_limits<scalar_t>::infinity(), max_b = max_a;
    for (const auto& [lo, hi] : {std::pair<int64_t, int64_t>{0, diag}, {diag + 1, n}}) {
#pragma omp simd reduction(max : max_a, max_b)
      for (int64_t j = lo; j < hi; ++j) {
        max_a = a[j] > max_a ? a[j] : max_a;
        max_b = b[j] > max_b ? b[j] : max_b;
      }
    }
    const double sum_a = blocked_sum_except(n, diag, [a, max_a](int64_t j) { return fast_exp(a[j] - max_a); });
    const double sum_b = blocked_sum_except(n, diag, [b, max_b](int64_t j) { return fast_exp(b[j] - max_b); });
    const double weighted = blocked_sum_except(
        n, diag, [a, b, max_a](int64_t j) { return fast_exp(a[j] - max_a) * (a[j] - b[j]); });
    // Differences first: with one column, (a − b) − ((max_a − max_b) + 0) is exactly 0.
    const scalar_t kl = static_cast<scalar_t>(weighted / sum_a - ((max_a - max_b) + (std::log(sum_a) - std::log(sum_b))));
    if (grad_s || grad_t) {
      const scalar_t lse_a = static_cast<scalar_t>(max_a + std::log(sum_a));
      const scalar_t lse_b = static_cast<scalar_t>(max_b + std::log(sum_b));
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t log_p = a[j] - lse_a, log_q = b[j] - lse_b;
        const scalar_t p = fast_exp(log_p);
        b[j] = scale * (fast_exp(log_q) - p);
        a[j] = scale * p * (log_p - log_q - kl);
      }
      gs[diag] = gt[diag] = 0;
    }
    return kl;
  }
};

// ---------------------------------------------------------------------------------------------
// kl over the upper triangle. G^S and G^T are symmetric, so the pair {i, j} gives row i and row j
// the same two numbers: this path computes each pair's similarities once for both rows, where
// tile_rows computes them once per row. Row block I = [r0, r0 + rows) meets the columns
// [r0, n) (its strip), and a strip holds the pairs i < j of its rows. Pass 1 gathers each row's
// centred sums from its strip's row and from earlier strips' columns; the loss needs nothing more.
// Pass 2, for gradients, recomputes the strips and weighs each pair with both rows' statistics.
// Forward N²·(Ds+Dt) FLOPs where tile_rows takes 2·N²·(Ds+Dt); forward and gradients together
// 6·N²·D where tile_rows takes 8·N²·D (D = Ds = Dt, teacher frozen); strips of b rows add n·b/2
// pairs to the n²/2 (upper_triangle_block).
//
// Each row's exponentials take the fixed shift |scale| (normalized rows: |a| ≤ |scale|, so
// e = e^{a − |scale|} lies in [e^{−40}, 1] for kKlCentredMaxScale = 20): rows need no running max,
// and p = e / Z whatever the shift.
// ---------------------------------------------------------------------------------------------

// The centred sums of one row over a set of its pairs, with e = e^{a − |scale|} and d = b − a:
// Z = Σ e, the centre m = Σ e·d / Z and V = Σ e (e^{d − m} − 1 − (d − m)), every term ≥ 0.
// Two sets merge exactly about their joint centre (as Chan et al. merge variances):
//   V = e^{δ₁}V₁ + Z₁(e^{δ₁} − 1 − δ₁) + e^{δ₂}V₂ + Z₂(e^{δ₂} − 1 − δ₂),  δₖ = mₖ − m.
// Over the whole row, m = μ and KL = log1p(V / Z) (RowMath::kl_centred).
struct CentredSums {
  double z = 0, m = 0, v = 0;

  // A set whose sums were taken about a centre m0 near its mean (m0 is rounded to the inputs'
  // type): v0 = Σ e (e^{d − m0} − 1 − (d − m0)) and s1 = Σ e (d − m0). Moved to the mean
  // m = m0 − δ, δ = −s1 / z, by the identity v = e^{δ}v0 + z(e^{δ} − 1 − δ − δ(e^{δ} − 1)), and
  // merged. Without the move a row's μ kept m0's rounding, and a row of one pair, where the KL and
  // its gradient are exactly 0, got a gradient of 1e-6.
  void merge_about(double z2, double m0, double s1, double v0) {
    if (z2 == 0) return;
    const double delta = -s1 / z2;
    merge(z2, m0 - delta, std::exp(delta) * v0 + z2 * (expm1_minus_x(delta) - delta * std::expm1(delta)));
  }

  // An empty set has z exactly 0 (its e are zeroed); a NaN z is merged, so that NaN reaches the loss.
  void merge(double z2, double m2, double v2) {
    if (z2 == 0) return;
    if (z == 0) {
      z = z2, m = m2, v = v2;
      return;
    }
    const double total = z + z2, centre = m + (m2 - m) * (z2 / total);
    const double d1 = m - centre, d2 = m2 - centre;
    v = std::exp(d1) * v + z * expm1_minus_x(d1) + std::exp(d2) * v2 + z2 * expm1_minus_x(d2);
    z = total, m = centre;
  }
};

template <typename scalar_t>
struct KlStrip {
  scalar_t* gs;  // (rows, width): G^S of the strip, then d; in pass 2 the weights dG^S
  scalar_t* gt;  // (rows, width): G^T of the strip, then e; in pass 2 the weights dG^T
  int64_t rows, width;
  scalar_t scale, shift;

  // Row r's pairs are the columns c > r. The others get e = 0 and d = 0: no weight in any sum.
  void to_exponentials_and_differences(int64_t r) const {
    scalar_t* s = gs + r * width;
    scalar_t* t = gt + r * width;
    const int64_t first = std::min(r + 1, width);
    for (int64_t c = 0; c < first; ++c) s[c] = t[c] = 0;
    const scalar_t scale_ = scale, shift_ = shift;
#pragma omp simd
    for (int64_t c = first; c < width; ++c) {
      const scalar_t a = t[c] * scale_;
      s[c] = (s[c] - t[c]) * scale_;  // d = scale·(b − a), as RowMath::kl_centred
      t[c] = fast_exp(a - shift_);
    }
  }

  // The centred sums of row r over its pairs in this strip (after to_exponentials_and_differences).
  void merge_row(int64_t r, CentredSums& sums) const {
    const scalar_t* d = gs + r * width;
    const scalar_t* e = gt + r * width;
    const int64_t first = std::min(r + 1, width);
    const auto [z, ed] = blocked_sums(first, width, [e](int64_t c) { return e[c]; },
                                      [e, d](int64_t c) { return e[c] * d[c]; });
    if (z == 0) return;
    const scalar_t m = static_cast<scalar_t>(ed / z);
    const auto [s1, v] = blocked_sums(first, width, [e, d, m](int64_t c) { return e[c] * (d[c] - m); },
                                      [e, d, m](int64_t c) { return e[c] * expm1_minus_x(d[c] - m); });
    sums.merge_about(z, m, s1, v);
  }

  // The centred sums of columns [c0, c1) over this strip's rows, each merged into its row's sums
  // (column c is row r0 + c). Sweeps the rows with one accumulator per column, in double (these
  // loops vectorize across columns, so the wider accumulator costs only lanes).
  void merge_columns(int64_t c0, int64_t c1, CentredSums* sums) const {
    const int64_t count = c1 - c0;
    std::vector<double> z(count, 0.0), ed(count, 0.0), s1(count, 0.0), v(count, 0.0);
    std::vector<scalar_t> m(count);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* d = gs + r * width + c0;
      const scalar_t* e = gt + r * width + c0;
      double* z_ = z.data();
      double* ed_ = ed.data();
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) {
        z_[c] += e[c];
        ed_[c] += e[c] * d[c];
      }
    }
    for (int64_t c = 0; c < count; ++c) m[c] = z[c] == 0 ? scalar_t(0) : static_cast<scalar_t>(ed[c] / z[c]);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* d = gs + r * width + c0;
      const scalar_t* e = gt + r * width + c0;
      const scalar_t* m_ = m.data();
      double* s1_ = s1.data();
      double* v_ = v.data();
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) {
        const scalar_t x = d[c] - m_[c];
        s1_[c] += e[c] * x;
        v_[c] += e[c] * expm1_minus_x(x);
      }
    }
    for (int64_t c = 0; c < count; ++c) sums[c].merge_about(z[c], m[c], s1[c], v[c]);
  }

  // Pass 2: the pair weights of dG^S and dG^T for row r of the strip (global index `row`), from
  // both rows' statistics (mu, kl, p_scale = scale / Z, indexed by row; column c is row col0 + c):
  // with x = d − μ per row,
  //   dG^S = scale·p·expm1(x − KL),  dG^T = −scale·p·x   (RowMath::kl_centred), p = e / Z,
  // summed over the pair's two rows: G = x̂x̂ᵀ then sends the weight to both rows' gradients.
  void to_weights(int64_t r, int64_t row, const scalar_t* mu, const scalar_t* kl, const scalar_t* p_scale,
                  int64_t col0) const {
    scalar_t* s = gs + r * width;
    scalar_t* t = gt + r * width;
    const int64_t first = std::min(r + 1, width);
    for (int64_t c = 0; c < first; ++c) s[c] = t[c] = 0;
    const scalar_t scale_ = scale, shift_ = shift;
    const scalar_t mu_i = mu[row], kl_i = kl[row], p_scale_i = p_scale[row];
    const scalar_t* mu_j = mu + col0;
    const scalar_t* kl_j = kl + col0;
    const scalar_t* p_scale_j = p_scale + col0;
#pragma omp simd
    for (int64_t c = first; c < width; ++c) {
      const scalar_t a = t[c] * scale_;
      const scalar_t e = fast_exp(a - shift_), d = (s[c] - t[c]) * scale_;
      const scalar_t x_i = d - mu_i, x_j = d - mu_j[c];
      const scalar_t p_i = e * p_scale_i, p_j = e * p_scale_j[c];
      s[c] = p_i * fast_expm1(x_i - kl_i) + p_j * fast_expm1(x_j - kl_j[c]);
      t[c] = -(p_i * x_i + p_j * x_j);
    }
  }
};

// Strips of b rows cover n²/2 + n·b/2 of the n² pairs: b = n/8 leaves 56% of the whole-rows
// work, b = n (one strip) all of it plus a second pass. Never below row_block's 256 rows (the
// inner dimension of the column-side gradient GEMM), so the upper triangle pays from n = 1024 on
// (kUpperTriangleMinRows); below, whole rows serve.
constexpr int64_t kUpperTriangleMinRows = 1024;

inline int64_t upper_triangle_block(int64_t n, int64_t element_size) {
  return std::min(row_block(n, 2 * n, element_size), std::max<int64_t>(256, n / 8));
}

// kl in its centred form over every row, the upper-triangle way (above). Returns the per-row
// losses (n,) and, with gradients, those of their sum with respect to x̂ and ŷ (where needed).
template <typename scalar_t>
void kl_upper_triangle(const at::Tensor& x, const at::Tensor& y, scalar_t scale, at::Tensor& losses,
                       at::Tensor& dx, at::Tensor& dy) {
  const int64_t n = x.size(0);
  const int64_t block = upper_triangle_block(n, sizeof(scalar_t));
  const auto opts = x.options();
  at::Tensor gs_buf = at::empty({block * n}, opts), gt_buf = at::empty({block * n}, opts);
  const scalar_t shift = std::abs(scale);

  // Runs fn(strip, r0, G^S, G^T) on every strip after its two GEMMs.
  auto for_each_strip = [&](auto fn) {
    for (int64_t r0 = 0; r0 < n; r0 += block) {
      const int64_t rows = std::min(block, n - r0), width = n - r0;
      at::Tensor gs = gs_buf.narrow(0, 0, rows * width).view({rows, width});
      at::Tensor gt = gt_buf.narrow(0, 0, rows * width).view({rows, width});
      at::mm_out(gs, x.narrow(0, r0, rows), x.narrow(0, r0, width).t());
      at::mm_out(gt, y.narrow(0, r0, rows), y.narrow(0, r0, width).t());
      fn(KlStrip<scalar_t>{gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), rows, width, scale, shift}, r0, gs,
         gt);
    }
  };

  std::vector<CentredSums> sums(n);
  for_each_strip([&](const KlStrip<scalar_t>& strip, int64_t r0, const at::Tensor&, const at::Tensor&) {
    at::parallel_for(0, strip.rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        strip.to_exponentials_and_differences(r);
        strip.merge_row(r, sums[r0 + r]);
      }
    });
    // After the rows: columns [0, rows) of the strip are the same rows' sums.
    at::parallel_for(0, strip.width, 256, [&](int64_t begin, int64_t end) {
      strip.merge_columns(begin, end, sums.data() + r0 + begin);
    });
  });

  scalar_t* out = losses.data_ptr<scalar_t>();
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(std::log1p(sums[i].v / sums[i].z));
  if (!dx.defined() && !dy.defined()) return;

  at::Tensor stats = at::empty({3, n}, opts);
  scalar_t* mu = stats[0].data_ptr<scalar_t>();
  scalar_t* kl = stats[1].data_ptr<scalar_t>();
  scalar_t* p_scale = stats[2].data_ptr<scalar_t>();
  for (int64_t i = 0; i < n; ++i) {
    mu[i] = static_cast<scalar_t>(sums[i].m);
    kl[i] = out[i];
    p_scale[i] = static_cast<scalar_t>(scale / sums[i].z);
  }
  for_each_strip([&](const KlStrip<scalar_t>& strip, int64_t r0, const at::Tensor& gs, const at::Tensor& gt) {
    at::parallel_for(0, strip.rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) strip.to_weights(r, r0 + r, mu, kl, p_scale, r0);
    });
    const int64_t rows = strip.rows, width = strip.width;
    if (dx.defined()) {
      dx.narrow(0, r0, rows).addmm_(gs, x.narrow(0, r0, width));
      dx.narrow(0, r0, width).addmm_(gs.t(), x.narrow(0, r0, rows));
    }
    if (dy.defined()) {
      dy.narrow(0, r0, rows).addmm_(gt, y.narrow(0, r0, width));
      dy.narrow(0, r0, width).addmm_(gt.t(), y.narrow(0, r0, rows));
    }
  });
}

// Rows [row_start, row_start + row_count) against all n columns, one row block at a time: both
// similarity blocks through GEMM, then RowMath on each whole row. Writes the rows' losses and,
// where dx / dy are defined, adds the gradients of their sum with respect to x̂ / ŷ.
template <typename scalar_t>
void tile_rows(const at::Tensor& x, const at::Tensor& y, Kind kind, bool kl_centred, scalar_t scale,
               int64_t row_start, int64_t row_count, at::Tensor& losses, at::Tensor& dx, at::Tensor& dy) {
  const int64_t n = x.size(0);
  const bool grad_s = dx.defined(), grad_t = dy.defined();
  const int64_t block = row_block(row_count, 2 * n, sizeof(scalar_t));
  at::Tensor gs_buf = at::empty({block, n}, x.options()), gt_buf = at::empty({block, n}, x.options());
  for (int64_t start = row_start; start < row_start + row_count; start += block) {
    const int64_t rows = std::min(block, row_start + row_count - start);
    at::Tensor gs = gs_buf.narrow(0, 0, rows), gt = gt_buf.narrow(0, 0, rows);
    at::mm_out(gs, x.narrow(0, start, rows), x.t());
    at::mm_out(gt, y.narrow(0, start, rows), y.t());
    scalar_t* gs_p = gs.data_ptr<scalar_t>();
    scalar_t* gt_p = gt.data_ptr<scalar_t>();
    scalar_t* out = losses.data_ptr<scalar_t>() + (start - row_start);
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        RowMath<scalar_t> row{gs_p + r * n, gt_p + r * n, n, start + r, scale};
        out[r] = kind == Kind::kMse       ? row.mse(grad_s, grad_t)
                 : kind == Kind::kPearson ? row.pearson(grad_s, grad_t)
                 : kl_centred             ? row.kl_centred(grad_s, grad_t)
                                          : row.kl(grad_s, grad_t);
      }
    });
    if (grad_s) {
      dx.narrow(0, start, rows).addmm_(gs, x);
      dx.addmm_(gs.t(), x.narrow(0, start, rows));
    }
    if (grad_t) {
      dy.narrow(0, start, rows).addmm_(gt, y);
      dy.addmm_(gt.t(), y.narrow(0, start, rows));
    }
  }
}

// Returns the per-row losses of rows [row_start, row_start + row_count); with `with_grad`, also
// the gradients of their sum with respect to s and t (where needed). kl in its centred form over
// every row (one process, or no rows split across ranks) takes the upper triangle; the rest
// whole rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_pass(const at::Tensor& s, const at::Tensor& t,
                                                         c10::string_view kind_name, double scale, bool normalize,
                                                         int64_t row_start, int64_t row_count, bool with_grad,
                                                         bool need_s, bool need_t) {
  const Kind kind = parse_kind(kind_name);
  // The public losses never pass other rows; a direct call of the op may, and a row outside [0, N)
  // would index outside the inputs and the gradients (a negative one wrote before the buffer).
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2 && s.size(0) == t.size(0),
              "s and t must be (N, D) matrices with the same number of rows, got ", s.sizes(), " and ", t.sizes());
  TORCH_CHECK(row_start >= 0 && row_count >= 0 && row_start + row_count <= s.size(0),
              "rows [row_start, row_start + row_count) must lie in [0, ", s.size(0), "), got row_start=", row_start,
              " row_count=", row_count);
  const auto acc = accumulation_dtype(s, t);
  const Normalized x = normalize_rows(s, acc, normalize), y = normalize_rows(t, acc, normalize);
  const int64_t n = x.rows.size(0);
  const auto opts = x.rows.options();
  const bool grad_s = with_grad && need_s, grad_t = with_grad && need_t;
  at::Tensor losses = at::empty({row_count}, opts);
  at::Tensor dx = grad_s ? at::zeros_like(x.rows) : at::Tensor();
  at::Tensor dy = grad_t ? at::zeros_like(y.rows) : at::Tensor();
  const bool kl_centred = normalize && std::abs(scale) <= kKlCentredMaxScale;
  AT_DISPATCH_FLOATING_TYPES(acc, "structure_tile", [&] {
    if (kind == Kind::kKl && kl_centred && row_start == 0 && row_count == n && n >= kUpperTriangleMinRows) {
      kl_upper_triangle<scalar_t>(x.rows, y.rows, static_cast<scalar_t>(scale), losses, dx, dy);
    } else {
      tile_rows<scalar_t>(x.rows, y.rows, kind, kl_centred, static_cast<scalar_t>(scale), row_start, row_count,
                          losses, dx, dy);
    }
  });
  at::Tensor ds = grad_s ? normalize_backward(dx, x) : at::empty({0}, opts);
  at::Tensor dt = grad_t ? normalize_backward(dy, y) : at::empty({0}, opts);
  return {losses, ds, dt};
}

}  // namespace

at::Tensor structure_tile_forward(const at::Tensor& s, const at::Tensor& t, c10::string_view kind, double scale,
                                  bool normalize, int64_t row_start, int64_t row_count) {
  return std::get<0>(tile_pass(s, t, kind, scale, normalize, row_start, row_count, false, false, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> structure_tile_forward_with_grad(
    const at::Tensor& s, const at::Tensor& t, c10::string_view kind, double scale, bool normalize,
    int64_t row_start, int64_t row_count, bool need_s, bool need_t) {
  auto [losses, ds, dt] = tile_pass(s, t, kind, scale, normalize, row_start, row_count, true, need_s, need_t);
  return {losses.sum(), ds, dt};
}

}  // namespace cpu
}  // namespace mmkd
