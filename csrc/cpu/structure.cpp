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

Kind parse_kind(c10::string_view kind) {
  if (kind == "mse") return Kind::kMse;
  if (kind == "pearson") return Kind::kPearson;
  TORCH_CHECK(kind == "kl", "kind must be 'mse', 'pearson' or 'kl', got '", std::string(kind), "'");
  return Kind::kKl;
}

// Row sums accumulate in double: a float32 row of N = 16K terms summed in order loses about
// sqrt(N)·eps, which took kl's loss past the 1e-5 tolerance at N = 4096.
template <typename scalar_t>
struct RowMath {
  scalar_t* gs;  // the row of G^S (n), becomes dG^S when gradients are wanted
  scalar_t* gt;  // the row of G^T (n), becomes dG^T
  int64_t n, diag;
  scalar_t scale;

  scalar_t mse(bool grad_s, bool grad_t) {
    const scalar_t others = scalar_t(n - 1);
    double sum = 0;
    gs[diag] = gt[diag] = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) sum += (gs[j] - gt[j]) * (gs[j] - gt[j]);
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
    const scalar_t ds = gs[diag], dt = gt[diag];
    double sum_s = 0, sum_t = 0;
#pragma omp simd reduction(+ : sum_s, sum_t)
    for (int64_t j = 0; j < n; ++j) {
      sum_s += gs[j];
      sum_t += gt[j];
    }
    const scalar_t mean_s = static_cast<scalar_t>((sum_s - ds) / others);
    const scalar_t mean_t = static_cast<scalar_t>((sum_t - dt) / others);
    gs[diag] = mean_s;  // centered to 0: the diagonal drops out of every sum below
    gt[diag] = mean_t;
    double var_sum_s = 0, var_sum_t = 0, cov_sum = 0;
#pragma omp simd reduction(+ : var_sum_s, var_sum_t, cov_sum)
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t cs = gs[j] - mean_s, ct = gt[j] - mean_t;
      var_sum_s += cs * cs;
      var_sum_t += ct * ct;
      cov_sum += cs * ct;
    }
    const scalar_t var_s = static_cast<scalar_t>(var_sum_s), var_t = static_cast<scalar_t>(var_sum_t);
    const scalar_t cov = static_cast<scalar_t>(cov_sum);
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

  scalar_t kl(bool grad_s, bool grad_t) {
    // a = G^T/τ (teacher, P) and b = G^S/τ (student, Q), scaled in place once: every later use
    // reads the same rounded value (no multiply left for the compiler to fuse differently).
    const scalar_t minus_inf = -std::numeric_limits<scalar_t>::infinity();
    scalar_t max_a = minus_inf, max_b = minus_inf;
    gs[diag] = gt[diag] = 0;
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t a = gt[j] *= scale, b = gs[j] *= scale;
      if (j == diag) continue;
      max_a = a > max_a || a != a ? a : max_a;
      max_b = b > max_b || b != b ? b : max_b;
    }
    gs[diag] = gt[diag] = minus_inf;  // exp(−inf) = 0: the diagonal drops out
    double sum_a = 0, sum_b = 0, weighted = 0;
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t pa = fast_exp(gt[j] - max_a);
      sum_a += pa;
      sum_b += fast_exp(gs[j] - max_b);
      if (j != diag) weighted += pa * (gt[j] - gs[j]);
    }
    // Differences first: with one column, (a − b) − ((max_a − max_b) + 0) is exactly 0.
    const scalar_t kl = static_cast<scalar_t>(weighted / sum_a - ((max_a - max_b) + (std::log(sum_a) - std::log(sum_b))));
    if (grad_s || grad_t) {
      const scalar_t lse_a = static_cast<scalar_t>(max_a + std::log(sum_a));
      const scalar_t lse_b = static_cast<scalar_t>(max_b + std::log(sum_b));
      for (int64_t j = 0; j < n; ++j) {
        if (j == diag) {
          gs[j] = gt[j] = 0;
          continue;
        }
        const scalar_t log_p = gt[j] - lse_a, log_q = gs[j] - lse_b;
        const scalar_t p = fast_exp(log_p);
        gs[j] = scale * (fast_exp(log_q) - p);
        gt[j] = scale * p * (log_p - log_q - kl);
      }
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
          out[r] = kind == Kind::kMse ? row.mse(grad_s, grad_t)
                   : kind == Kind::kPearson ? row.pearson(grad_s, grad_t)
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
