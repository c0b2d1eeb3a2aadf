// CUDA implementations of the mmkd_native ops (schemas: csrc/bindings.cpp, the same as
// mmkd_kernels/ops.py SCHEMAS; C++ signatures: csrc/ops.h). Function for function these are the
// Python launchers of mmkd_kernels/triton/contrastive.py and structure.py: inverse norms computed
// here with ATen, the kernels of contrastive.cu and structure.cu through their C launchers
// (launchers.h) on the current stream, and the normalization's backward as an N×D ATen epilogue.
//
// Inputs are float32, float16 or bfloat16 CUDA matrices (float64 is refused: use 'chunked');
// two inputs of different dtypes are computed in their promoted dtype. Losses, statistics and the
// *_forward_with_grad gradients are float32; contrastive_backward returns the inputs' dtypes; an
// input that needs no gradient, or a loss that is not symmetric, gets an empty (0,) tensor.
//
// GPU validation is owed: this file is compiled only where torch has CUDA (not on the CPU CI).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "../ops.h"
#include "launchers.h"

namespace mmkd {
namespace cuda {
namespace {

constexpr double kEps = 1e-8;  // reference.EPS

// The launchers' dtype of an input matrix.
int dtype_code(const at::Tensor& x, const char* name) {
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
                   "mmkd_native CUDA ops take float32, float16 or bfloat16 inputs, got ", type, " for ", name,
                   " (float64 runs on backend='chunked' or 'reference')");
  return type == at::kFloat ? MMKD_FLOAT32 : type == at::kHalf ? MMKD_FLOAT16 : MMKD_BFLOAT16;
}

void check_matrix(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D (rows, width), got shape ", x.sizes());
  dtype_code(x, name);
}

void check_vector(const at::Tensor& v, const char* name, int64_t size, const at::Tensor& like) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == size, name, " must have shape (", size, ",), got ", v.sizes());
  TORCH_CHECK(v.device() == like.device(), name, " must be on ", like.device(), ", got ", v.device());
}

// Both matrices checked, on one device, in their promoted dtype (no copy when they agree).
std::tuple<at::Tensor, at::Tensor> common_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                                                const char* b_name) {
  check_matrix(a, a_name);
  check_matrix(b, b_name);
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on one device, got ", a.device(),
              " and ", b.device());
  const at::ScalarType type = at::promote_types(a.scalar_type(), b.scalar_type());
  return {a.to(type), b.to(type)};
}

void check_launch(int error, const char* launcher) {
  TORCH_CHECK(error == cudaSuccess, launcher, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(error)));
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

at::TensorOptions floats(const at::Tensor& like) { return like.options().dtype(at::kFloat); }

// ‖x_i‖ accumulated and returned in float32 from x of any dtype, without a float32 copy of x.
at::Tensor row_norms(const at::Tensor& x) {
  return at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, /*keepdim=*/false, at::kFloat);
}

// 1 / max(‖x_i‖, eps) in float32 (ones when not normalizing), as tiles.inverse_norms.
at::Tensor inverse_norms(const at::Tensor& x, bool normalize) {
  if (!normalize) return at::ones({x.size(0)}, floats(x));
  return row_norms(x).clamp_min_(kEps).reciprocal_();
}

// dx (float32) from dx̂ (float32, in place), as tiles.input_grad: x̂ = x / max(‖x‖, eps) formed by
// division; dx = (dx̂ − x̂ (x̂·dx̂)) / ‖x‖ where ‖x‖ > eps, else dx̂ / eps.
at::Tensor input_grad(at::Tensor d_hat, const at::Tensor& x, bool normalize) {
  if (!normalize) return d_hat;
  const at::Tensor norms = row_norms(x).clamp_min_(kEps);
  const at::Tensor x_hat = x / norms.unsqueeze(1);  // float32 by type promotion: no copy of x first
  const at::Tensor radial = (x_hat * d_hat).sum(1) * norms.gt(kEps).to(at::kFloat);
  return d_hat.sub_(x_hat * radial.unsqueeze(1)).div_(norms.unsqueeze(1));
}

// --------------------------------------------------------------------------------------------------
// Contrastive loss
// --------------------------------------------------------------------------------------------------

// One term of dz (see mmkd_contrastive_grad): log-sum-exps, weights (float32), targets (int64) and
// the target entries g·expm1(−loss) (float32), exact where the softmax rounds to 1.
struct Term {
  at::Tensor lse, g, t, tg;
};

Term make_term(at::Tensor lse, at::Tensor g, at::Tensor t, const at::Tensor& loss) {
  at::Tensor tg = (g * at::expm1(-loss.to(at::kFloat))).contiguous();
  return Term{std::move(lse), std::move(g), std::move(t), std::move(tg)};
}

// (lse (n_a,), loss (n_a,)) of z = scale·Â B̂ᵀ read by rows of A. With `columns` (the symmetric
// loss, |z| ≤ |scale| ≤ MMKD_FIXED_SHIFT_MAX), also (col_lse, col_loss) from the same pass.
struct RowPass {
  at::Tensor lse, loss, col_lse, col_loss;
};

RowPass lse_by_rows(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_a, const at::Tensor& inv_b,
                    const at::Tensor& targets, double scale, bool columns = false) {
  at::Tensor lse = at::empty({a.size(0)}, floats(a));
  at::Tensor loss = at::empty_like(lse);
  at::Tensor col_other = columns ? at::zeros({b.size(0)}, floats(a)) : at::Tensor();
  at::Tensor col_target = columns ? at::empty({b.size(0)}, floats(a)) : at::Tensor();
  const double shift = std::abs(scale);
  check_launch(mmkd_contrastive_lse(dtype_code(a, "q"), a.data_ptr(), b.data_ptr(), inv_a.data_ptr<float>(),
                                    inv_b.data_ptr<float>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                    loss.data_ptr<float>(), columns ? col_other.data_ptr<float>() : nullptr,
                                    columns ? col_target.data_ptr<float>() : nullptr, a.size(0), b.size(0),
                                    a.size(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                    static_cast<float>(scale), static_cast<float>(shift), stream()),
               "mmkd_contrastive_lse");
  if (!columns) return {lse, loss, at::Tensor(), at::Tensor()};
  // The columns' results from their fixed-shift sums, in the rows' log1p form (end_row in
  // contrastive.cu): the target's weight against the others'.
  const at::Tensor shifted_target = col_target - shift;
  const at::Tensor weight = shifted_target.exp();
  const at::Tensor total = weight + col_other;
  const at::Tensor dominant = weight >= col_other;
  const at::Tensor col_loss =
      at::where(dominant, at::log1p(col_other / at::where(dominant, weight, at::ones_like(weight))),
                total.log() - shifted_target);
  return {lse, loss, total.log() + shift, col_loss};
}

// dÂ (n_a, D) float32 for the rows of A; a term that is null is off.
at::Tensor grad_rows(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_a, const at::Tensor& inv_b,
                     const Term* a_term, const Term* b_term, double scale) {
  at::Tensor da = at::empty({a.size(0), a.size(1)}, floats(a));
  check_launch(
      mmkd_contrastive_grad(dtype_code(a, "q"), a.data_ptr(), b.data_ptr(), inv_a.data_ptr<float>(),
                            inv_b.data_ptr<float>(), a_term ? a_term->lse.data_ptr<float>() : nullptr,
                            a_term ? a_term->g.data_ptr<float>() : nullptr,
                            a_term ? a_term->t.data_ptr<int64_t>() : nullptr,
                            a_term ? a_term->tg.data_ptr<float>() : nullptr,
                            b_term ? b_term->lse.data_ptr<float>() : nullptr,
                            b_term ? b_term->g.data_ptr<float>() : nullptr,
                            b_term ? b_term->t.data_ptr<int64_t>() : nullptr,
                            b_term ? b_term->tg.data_ptr<float>() : nullptr, da.data_ptr<float>(), a.size(0),
                            b.size(0), a.size(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                            static_cast<float>(scale), stream()),
      "mmkd_contrastive_grad");
  return da;
}

// (lse (n_a,), loss (n_a,), dÂ (n_a, D)) of the row term with g = 1, in one pass, for normalized
// rows (|z| ≤ |scale|, the fixed shift; every dtype's products hold e^{−2|scale|}, float16's in TF32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_grad_by_rows(const at::Tensor& a, const at::Tensor& b,
                                                                const at::Tensor& inv_a, const at::Tensor& inv_b,
                                                                const at::Tensor& targets, double scale) {
  at::Tensor lse = at::empty({a.size(0)}, floats(a));
  at::Tensor loss = at::empty_like(lse);
  at::Tensor da = at::empty({a.size(0), a.size(1)}, floats(a));
  check_launch(mmkd_contrastive_lse_grad(dtype_code(a, "q"), a.data_ptr(), b.data_ptr(), inv_a.data_ptr<float>(),
                                         inv_b.data_ptr<float>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                         loss.data_ptr<float>(), da.data_ptr<float>(), a.size(0), b.size(0),
                                         a.size(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                         static_cast<float>(scale), static_cast<float>(std::abs(scale)), stream()),
               "mmkd_contrastive_lse_grad");
  return {lse, loss, da};
}

// Whether lse_grad_by_rows serves the rows of q (see mmkd_contrastive_lse_grad).
bool one_pass(const at::Tensor& q, bool normalize, double scale) {
  return normalize && std::abs(scale) <= MMKD_FIXED_SHIFT_MAX;
}

// Targets as contiguous int64, one per row of q, into the rows of k. Their range is the caller's to
// check (functional.py; here it would cost a device sync): a target outside [0, M) gives NaN or
// drops its term, never a read outside k, except where k has no row at all, refused here.
at::Tensor row_targets(const at::Tensor& targets, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  check_vector(targets, "targets", q.size(0), q);
  TORCH_CHECK(k.size(0) > 0 || q.size(0) == 0, "k must have rows for q's ", q.size(0), " targets, got shape ",
              k.sizes());
  return targets.contiguous();
}

at::Tensor vector_f32(const at::Tensor& v, const char* name, int64_t size, const at::Tensor& like) {
  check_vector(v, name, size, like);
  return v.to(at::kFloat).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_forward(const at::Tensor& q,
                                                                               const at::Tensor& k,
                                                                               const at::Tensor& targets, double scale,
                                                                               bool normalize, bool symmetric) {
  auto [qc, kc] = common_dtype(q, "q", k, "k");
  TORCH_CHECK(qc.size(1) == kc.size(1), "q and k must have the same width, got ", qc.sizes(), " and ", kc.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor t = row_targets(targets, qc, kc);
  const at::Tensor inv_q = inverse_norms(qc, normalize);
  const at::Tensor inv_k = inverse_norms(kc, normalize);
  TORCH_CHECK(!symmetric || kc.size(0) == qc.size(0), "symmetric needs as many rows in k as in q, got ", kc.size(0),
              " and ", qc.size(0));
  // The columns' statistics from the rows' pass where z is bounded and bitwise reproducibility is
  // not asked for (their sums are atomic adds in no fixed order); else from a pass by columns.
  const bool columns_in_row_pass = symmetric && normalize && std::abs(scale) <= MMKD_FIXED_SHIFT_MAX &&
                                   !at::globalContext().deterministicAlgorithms();
  const RowPass rows = lse_by_rows(qc, kc, inv_q, inv_k, t, scale, columns_in_row_pass);
  if (!symmetric) return {rows.loss, rows.lse.new_empty({0}), rows.lse, rows.lse.new_empty({0})};
  if (columns_in_row_pass) return {rows.loss, rows.col_loss, rows.lse, rows.col_lse};
  const at::Tensor own = at::arange(kc.size(0), t.options());
  const RowPass cols = lse_by_rows(kc, qc, inv_k, inv_q, own, scale);
  return {rows.loss, cols.loss, rows.lse, cols.lse};
}

std::tuple<at::Tensor, at::Tensor> contrastive_backward(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                                        const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& targets, const at::Tensor& row_lse,
                                                        const at::Tensor& col_lse, const at::Tensor& row_loss,
                                                        const at::Tensor& col_loss, double scale, bool normalize,
                                                        bool symmetric, bool need_q, bool need_k) {
  auto [qc, kc] = common_dtype(q, "q", k, "k");
  TORCH_CHECK(qc.size(1) == kc.size(1), "q and k must have the same width, got ", qc.sizes(), " and ", kc.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t n = qc.size(0), m = kc.size(0);
  const at::Tensor inv_q = inverse_norms(qc, normalize);
  const at::Tensor inv_k = inverse_norms(kc, normalize);
  const Term row_term = make_term(vector_f32(row_lse, "row_lse", n, qc), vector_f32(grad_row, "grad_row", n, qc),
                                  row_targets(targets, qc, kc), vector_f32(row_loss, "row_loss", n, qc));
  std::optional<Term> col_term;
  if (symmetric) {
    col_term = make_term(vector_f32(col_lse, "col_lse", m, qc), vector_f32(grad_col, "grad_col", m, qc),
                         at::arange(m, qc.options().dtype(at::kLong)), vector_f32(col_loss, "col_loss", m, qc));
  }
  const Term* cols = col_term ? &*col_term : nullptr;
  at::Tensor dq = q.new_empty({0});
  at::Tensor dk = k.new_empty({0});
  if (need_q) {
    dq = input_grad(grad_rows(qc, kc, inv_q, inv_k, &row_term, cols, scale), qc, normalize).to(q.scalar_type());
  }
  if (need_k) {
    dk = input_grad(grad_rows(kc, qc, inv_k, inv_q, cols, &row_term, scale), kc, normalize).to(k.scalar_type());
  }
  return {dq, dk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_with_grad(const at::Tensor& q, const at::Tensor& k,
                                                                             const at::Tensor& targets, double scale,
                                                                             bool normalize, bool need_q,
                                                                             bool need_k) {
  auto [qc, kc] = common_dtype(q, "q", k, "k");
  TORCH_CHECK(qc.size(1) == kc.size(1), "q and k must have the same width, got ", qc.sizes(), " and ", kc.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor t = row_targets(targets, qc, kc);
  const at::Tensor inv_q = inverse_norms(qc, normalize);
  const at::Tensor inv_k = inverse_norms(kc, normalize);
  const bool fused_q = need_q && one_pass(qc, normalize, scale);
  at::Tensor lse_rows, loss_rows, dq_hat;
  if (fused_q) {
    std::tie(lse_rows, loss_rows, dq_hat) = lse_grad_by_rows(qc, kc, inv_q, inv_k, t, scale);
  } else {
    const RowPass rows = lse_by_rows(qc, kc, inv_q, inv_k, t, scale);
    lse_rows = rows.lse;
    loss_rows = rows.loss;
  }
  const Term row_term = make_term(lse_rows, at::ones_like(lse_rows), t, loss_rows);
  at::Tensor dq = lse_rows.new_empty({0});
  at::Tensor dk = lse_rows.new_empty({0});
  if (need_q) {
    dq = input_grad(fused_q ? dq_hat : grad_rows(qc, kc, inv_q, inv_k, &row_term, nullptr, scale), qc, normalize);
  }
  if (need_k) dk = input_grad(grad_rows(kc, qc, inv_k, inv_q, nullptr, &row_term, scale), kc, normalize);
  return {loss_rows.sum(), dq, dk};
}

// --------------------------------------------------------------------------------------------------
// Structure loss, tile algorithm
// --------------------------------------------------------------------------------------------------

namespace {

// The kernels' kind: kl takes its centred form for cosine similarities at a bounded scale, as the
// chunked and Triton backends do (chunked.KL_CENTRED_MAX_SCALE).
int kind_code(c10::string_view kind, bool normalize, double scale) {
  const std::string name(kind.data(), kind.size());
  if (name == "mse") return MMKD_MSE;
  if (name == "pearson") return MMKD_PEARSON;
  TORCH_CHECK(name == "kl", "kind must be 'mse', 'pearson' or 'kl', got '", name, "'");
  return normalize && std::abs(scale) <= MMKD_KL_CENTRED_MAX_SCALE ? MMKD_KL_CENTRED : MMKD_KL;
}

// s, t checked and in one dtype, with the row range checked against their N.
std::tuple<at::Tensor, at::Tensor> structure_inputs(const at::Tensor& s, const at::Tensor& t, int64_t row_start,
                                                    int64_t row_count) {
  auto [sc, tc] = common_dtype(s, "s", t, "t");
  TORCH_CHECK(sc.size(0) == tc.size(0), "s and t must have the same number of rows, got ", sc.sizes(), " and ",
              tc.sizes());
  TORCH_CHECK(row_start >= 0 && row_count >= 0 && row_count <= sc.size(0) - row_start,  // no overflow
              "rows [row_start, row_start + row_count) must lie in [0, ", sc.size(0), "), got row_start=", row_start,
              " row_count=", row_count);
  return {sc, tc};
}

// (per-row losses (row_count,), per-row statistics (row_count, 5)), float32.
std::tuple<at::Tensor, at::Tensor> rows(const at::Tensor& s, const at::Tensor& t, const at::Tensor& inv_s,
                                        const at::Tensor& inv_t, int kind, double scale, int64_t row_start,
                                        int64_t row_count) {
  at::Tensor loss = at::empty({row_count}, floats(s));
  at::Tensor stats = at::empty({row_count, MMKD_STRUCTURE_STATS}, floats(s));
  check_launch(mmkd_structure_rows(dtype_code(s, "s"), kind, s.data_ptr(), t.data_ptr(), inv_s.data_ptr<float>(),
                                   inv_t.data_ptr<float>(), loss.data_ptr<float>(), stats.data_ptr<float>(),
                                   s.size(0), row_start, row_count, s.size(1), t.size(1), s.stride(0), s.stride(1),
                                   t.stride(0), t.stride(1), static_cast<float>(scale), stream()),
               "mmkd_structure_rows");
  return {loss, stats};
}

// dx̂ (N, D_side) float32 of one side: the row terms of the computed rows and the column terms.
at::Tensor side_grad(const at::Tensor& s, const at::Tensor& t, const at::Tensor& inv_s, const at::Tensor& inv_t,
                     const at::Tensor& stats, const at::Tensor& grad, int kind, double scale, int64_t row_start,
                     int64_t row_count, int side) {
  const at::Tensor& x = side == MMKD_STUDENT ? s : t;
  at::Tensor d_hat = at::empty({x.size(0), x.size(1)}, floats(x));
  check_launch(mmkd_structure_grad(dtype_code(s, "s"), kind, side, s.data_ptr(), t.data_ptr(), inv_s.data_ptr<float>(),
                                   inv_t.data_ptr<float>(), stats.data_ptr<float>(), grad.data_ptr<float>(),
                                   d_hat.data_ptr<float>(), x.size(0), row_start, row_count, s.size(1), t.size(1),
                                   s.stride(0), s.stride(1), t.stride(0), t.stride(1), static_cast<float>(scale),
                                   stream()),
               "mmkd_structure_grad");
  return d_hat;
}

}  // namespace

at::Tensor structure_tile_forward(const at::Tensor& s, const at::Tensor& t, c10::string_view kind, double scale,
                                  bool normalize, int64_t row_start, int64_t row_count) {
  const int code = kind_code(kind, normalize, scale);
  auto [sc, tc] = structure_inputs(s, t, row_start, row_count);
  const c10::cuda::CUDAGuard guard(s.device());
  return std::get<0>(rows(sc, tc, inverse_norms(sc, normalize), inverse_norms(tc, normalize), code, scale,
                          row_start, row_count));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> structure_tile_forward_with_grad(const at::Tensor& s,
                                                                                const at::Tensor& t,
                                                                                c10::string_view kind, double scale,
                                                                                bool normalize, int64_t row_start,
                                                                                int64_t row_count, bool need_s,
                                                                                bool need_t) {
  const int code = kind_code(kind, normalize, scale);
  auto [sc, tc] = structure_inputs(s, t, row_start, row_count);
  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor inv_s = inverse_norms(sc, normalize);
  const at::Tensor inv_t = inverse_norms(tc, normalize);
  auto [loss, stats] = rows(sc, tc, inv_s, inv_t, code, scale, row_start, row_count);
  const at::Tensor ones = at::ones_like(loss);
  at::Tensor ds = loss.new_empty({0});
  at::Tensor dt = loss.new_empty({0});
  if (need_s) {
    ds = input_grad(side_grad(sc, tc, inv_s, inv_t, stats, ones, code, scale, row_start, row_count, MMKD_STUDENT), sc,
                    normalize);
  }
  if (need_t) {
    dt = input_grad(side_grad(sc, tc, inv_s, inv_t, stats, ones, code, scale, row_start, row_count, MMKD_TEACHER), tc,
                    normalize);
  }
  return {loss.sum(), ds, dt};
}

}  // namespace cuda
}  // namespace mmkd

TORCH_LIBRARY_IMPL(mmkd_native, CUDA, m) {
  m.impl("contrastive_forward", TORCH_FN(mmkd::cuda::contrastive_forward));
  m.impl("contrastive_backward", TORCH_FN(mmkd::cuda::contrastive_backward));
  m.impl("contrastive_forward_with_grad", TORCH_FN(mmkd::cuda::contrastive_forward_with_grad));
  m.impl("structure_tile_forward", TORCH_FN(mmkd::cuda::structure_tile_forward));
  m.impl("structure_tile_forward_with_grad", TORCH_FN(mmkd::cuda::structure_tile_forward_with_grad));
}
