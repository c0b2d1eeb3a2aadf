// The structure loss on CPU, tile algorithm (DESIGN §1.2): for each block of rows, both similarity
// blocks G^S = x̂_b x̂ᵀ and G^T = ŷ_b ŷᵀ through MKL's GEMM, then a fused per-row epilogue (the
// row is whole, so its statistics are exact two-pass sums) that writes the row's loss and, for a
// forward with gradients, turns the blocks into dG^S, dG^T in place. G = x̂x̂ᵀ sends dG to the
// block's rows (dG x̂) and to every column (dGᵀ x̂_b). Same math as mmkd_kernels/chunked.py _Tile.
#include "../ops.h"
#include "common.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <string>

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
    const scalar_t product = var_s * var_t, eps2 = scalar_t(kEps * kEps);
    const scalar_t denom = std::sqrt(product > eps2 ? product : eps2);
    const scalar_t r = cov / denom;
    if (grad_s || grad_t) {
      const scalar_t g_r = -1;  // loss = 1 − r
      const bool unclamped = product > eps2;
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
      const scalar_t a = gt[j] * scale;
      gs[j] = gs[j] * scale - a;
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

// One pass over the row blocks. Returns the per-row losses of rows [row_start, row_start + count);
// with `with_grad`, also the gradients of their sum with respect to s and t (where needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_pass(const at::Tensor& s, const at::Tensor& t,
                                                         c10::string_view kind_name, double scale, bool normalize,
                                                         int64_t row_start, int64_t row_count, bool with_grad,
                                                         bool need_s, bool need_t) {
  const Kind kind = parse_kind(kind_name);
  const auto acc = accumulation_dtype(s, t);
  const Normalized x = normalize_rows(s, acc, normalize), y = normalize_rows(t, acc, normalize);
  const int64_t n = x.rows.size(0);
  const auto opts = x.rows.options();
  const bool grad_s = with_grad && need_s, grad_t = with_grad && need_t;
  at::Tensor losses = at::empty({row_count}, opts);
  at::Tensor dx = grad_s ? at::zeros_like(x.rows) : at::Tensor();
  at::Tensor dy = grad_t ? at::zeros_like(y.rows) : at::Tensor();
  const bool kl_centred = normalize && std::abs(scale) <= kKlCentredMaxScale;
  const int64_t block = row_block(2 * n, at::elementSize(acc));
  at::Tensor gs_buf = at::empty({block, n}, opts), gt_buf = at::empty({block, n}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "structure_tile", [&] {
    for (int64_t start = row_start; start < row_start + row_count; start += block) {
      const int64_t rows = std::min(block, row_start + row_count - start);
      at::Tensor gs = gs_buf.narrow(0, 0, rows), gt = gt_buf.narrow(0, 0, rows);
      at::mm_out(gs, x.rows.narrow(0, start, rows), x.rows.t());
      at::mm_out(gt, y.rows.narrow(0, start, rows), y.rows.t());
      scalar_t* gs_p = gs.data_ptr<scalar_t>();
      scalar_t* gt_p = gt.data_ptr<scalar_t>();
      scalar_t* out = losses.data_ptr<scalar_t>() + (start - row_start);
      at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          RowMath<scalar_t> row{gs_p + r * n, gt_p + r * n, n, start + r, static_cast<scalar_t>(scale)};
          out[r] = kind == Kind::kMse       ? row.mse(grad_s, grad_t)
                   : kind == Kind::kPearson ? row.pearson(grad_s, grad_t)
                   : kl_centred             ? row.kl_centred(grad_s, grad_t)
                                            : row.kl(grad_s, grad_t);
        }
      });
      if (grad_s) {
        dx.narrow(0, start, rows).addmm_(gs, x.rows);
        dx.addmm_(gs.t(), x.rows.narrow(0, start, rows));
      }
      if (grad_t) {
        dy.narrow(0, start, rows).addmm_(gt, y.rows);
        dy.addmm_(gt.t(), y.rows.narrow(0, start, rows));
      }
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
