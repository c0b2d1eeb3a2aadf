// The contrastive loss on CPU (DESIGN §1.1): row blocks of z = scale · q̂ k̂ᵀ through MKL's GEMM,
// each followed by a fused epilogue over its rows while the block is in cache. Never more than a
// (block × M) tile; the same scheme as mmkd_kernels/chunked.py with the elementwise passes fused.
//
// The scale is folded into q̂ once (qs = scale·q̂), so z = qs k̂ᵀ, dq̂ = scale·dz k̂, dk̂ = dzᵀ qs.
#include "../ops.h"
#include "common.h"

#include <ATen/Parallel.h>

#include <limits>

namespace mmkd {
namespace cpu {
namespace {

// ℓ = log(a + b) − log a for a = exp(z_t − max) (target_weight), b = Σ_{j≠t} exp(z_j − max)
// (other) and z_t − max (shifted_target): log1p(b / a) while the target dominates, so that a nearly
// aligned pair's small loss keeps its digits (lse − z_t would cancel them), log(a + b) − (z_t − max)
// otherwise. As mmkd_kernels.chunked.target_loss.
inline double target_loss(double shifted_target, double target_weight, double other) {
  return target_weight >= other ? std::log1p(other / target_weight)
                                : std::log(target_weight + other) - shifted_target;
}

// Per row of a block z (rows × m): lse and the loss. With `to_grad`, z becomes softmax −
// onehot(target) in place, the target's entry taken as −Σ_{j≠t} p_j (exact where p_t rounds to 1):
// the gradient of the row's loss with respect to its logits.
template <typename scalar_t>
void row_epilogue(scalar_t* z, int64_t rows, int64_t m, const int64_t* targets, scalar_t* lse,
                  scalar_t* loss, bool to_grad) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = z + r * m;
      // A NaN never wins this max, but it reaches the sum below through exp(NaN − max): the loss
      // is NaN all the same, and the loop vectorizes.
      scalar_t max = -std::numeric_limits<scalar_t>::infinity();
#pragma omp simd reduction(max : max)
      for (int64_t j = 0; j < m; ++j) max = row[j] > max ? row[j] : max;
      const int64_t t = targets[r];
      const scalar_t shifted_target = row[t] - max;
      const double target_weight = fast_exp(shifted_target);
      // The sum leaves the target out, so a nearly aligned pair's b = Σ_{j≠t} e^{z_j − max} keeps
      // its digits beside a = 1.
      double other;
      if (to_grad) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) row[j] = fast_exp(row[j] - max);
        other = blocked_sum_except(m, t, [row](int64_t j) { return row[j]; });
      } else {
        other = blocked_sum_except(m, t, [row, max](int64_t j) { return fast_exp(row[j] - max); });
      }
      const double sum = target_weight + other;
      lse[r] = static_cast<scalar_t>(max + std::log(sum));
      loss[r] = static_cast<scalar_t>(target_loss(shifted_target, target_weight, other));
      if (to_grad) {
        const scalar_t inv = static_cast<scalar_t>(1.0 / sum);
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) row[j] *= inv;
        row[t] = static_cast<scalar_t>(-other / sum);
      }
    }
  });
}

// Column statistics of one block (rows start..) merged into running (max, other) over all rows so
// far, `other` summing exp(z_ij − max_j) without the diagonal i = j, whose logit goes to
// `diagonal`: one pass over z serves both directions of the symmetric loss. Each task takes a slab
// of columns and walks the block row by row, so that the inner loops run along memory and
// vectorize (a column at a time strides by m and does not: it took most of the symmetric forward).
// A column's sum runs over every row, N terms: added one by one in float32, the small ones fell
// below the running sum's last digit, and the column losses were 3.7e-5 off at N = 32768. The rows
// are added in float32 a chunk of kChunk at a time, each chunk's partial sum into a double total.
template <typename scalar_t>
void merge_columns(const scalar_t* z, int64_t rows, int64_t m, int64_t start, scalar_t* col_max,
                   scalar_t* col_other, scalar_t* diagonal) {
  constexpr int64_t kSlab = 512;  // columns per task: their running max and sums stay in L1
  constexpr int64_t kChunk = 64;  // rows per float32 partial sum
  constexpr scalar_t kMinusInf = -std::numeric_limits<scalar_t>::infinity();
  at::parallel_for(0, (m + kSlab - 1) / kSlab, 1, [&](int64_t first, int64_t last) {
    scalar_t max[kSlab], sum[kSlab];
    double total[kSlab];
    for (int64_t slab = first; slab < last; ++slab) {
      const int64_t lo = slab * kSlab, width = std::min(kSlab, m - lo);
      for (int64_t c = 0; c < width; ++c) max[c] = col_max[lo + c];
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* zr = z + r * m + lo;
        // A NaN wins, so that it reaches the column's sum and loss.
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) max[c] = zr[c] > max[c] || zr[c] != zr[c] ? zr[c] : max[c];
      }
      for (int64_t c = 0; c < width; ++c) {
        const scalar_t old = col_max[lo + c];
        total[c] = old == kMinusInf ? 0.0 : static_cast<double>(col_other[lo + c]) * std::exp(double(old) - max[c]);
      }
      for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
        for (int64_t c = 0; c < width; ++c) sum[c] = 0;
        for (int64_t r = r0; r < std::min(rows, r0 + kChunk); ++r) {
          const scalar_t* zr = z + r * m + lo;
          const int64_t own = start + r - lo;  // the diagonal's column within the slab, if there
          const int64_t split = std::max<int64_t>(0, std::min(own, width));
#pragma omp simd
          for (int64_t c = 0; c < split; ++c) sum[c] += fast_exp(zr[c] - max[c]);
#pragma omp simd
          for (int64_t c = std::max(split, own + 1); c < width; ++c) sum[c] += fast_exp(zr[c] - max[c]);
          if (own >= 0 && own < width) diagonal[lo + own] = zr[own];
        }
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) total[c] += sum[c];
      }
      for (int64_t c = 0; c < width; ++c) {
        col_max[lo + c] = max[c];
        col_other[lo + c] = static_cast<scalar_t>(total[c]);
      }
    }
  });
}

// A recomputed block z (rows × m, rows start..) becomes dz in place:
// dz_ij = g_i (p_ij − [j = t_i]) + g'_j (p'_ij − [i = j]), p the row softmax (lse), p' the column
// softmax (col_lse; the column term only for the symmetric loss, col_lse == nullptr otherwise).
// The target's p − 1 is expm1(−ℓ) from the forward's loss, exact where p rounds to 1. The
// symmetric loss has t_i = i, so its two one-hot terms share the diagonal entry.
template <typename scalar_t>
void grad_epilogue(scalar_t* z, int64_t rows, int64_t m, int64_t start, const int64_t* targets,
                   const scalar_t* lse, const scalar_t* loss, const scalar_t* g, const scalar_t* col_lse,
                   const scalar_t* col_loss, const scalar_t* g_col) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = start + r;
      scalar_t* row = z + r * m;
      const scalar_t gi = g[i], li = lse[i];
      const double target_grad = gi * std::expm1(-static_cast<double>(loss[i]));
      if (col_lse != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) row[j] = gi * fast_exp(row[j] - li) + g_col[j] * fast_exp(row[j] - col_lse[j]);
        row[i] = static_cast<scalar_t>(target_grad + g_col[i] * std::expm1(-static_cast<double>(col_loss[i])));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) row[j] = gi * fast_exp(row[j] - li);
        row[targets[i]] = static_cast<scalar_t>(target_grad);
      }
    }
  });
}

struct Inputs {
  Normalized q, k;
  at::Tensor qs;  // scale · q̂
  int64_t n, m, block;
};

// The kernels index rows of z by target: one out of [0, m) would read or write past the block.
// mmkd_kernels.contrastive_loss checks eagerly and asserts under torch.compile; this guards a
// direct call of the op (an O(N) pass, against the O(N·M·D) of the loss), as do the shape checks
// below (the epilogues index every per-row vector up to N, the symmetric loss's up to M = N).
at::Tensor checked_targets(const at::Tensor& targets, int64_t n, int64_t m) {
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n, "targets must have shape (", n, ",), got ",
              targets.sizes());
  at::Tensor tgt = targets.contiguous();
  const int64_t* t = tgt.data_ptr<int64_t>();
  for (int64_t i = 0; i < tgt.numel(); ++i) {
    TORCH_CHECK(t[i] >= 0 && t[i] < m, "targets must lie in [0, ", m, ") (teacher rows), got ", t[i], " at row ", i);
  }
  return tgt;
}

void check_vector(const at::Tensor& v, const char* name, int64_t size) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == size, name, " must have shape (", size, ",), got ", v.sizes());
}

Inputs prepare(const at::Tensor& q, const at::Tensor& k, double scale, bool normalize, bool symmetric) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "q and k must be 2-D (rows, width), got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "q and k must have the same width, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()) && at::isFloatingType(k.scalar_type()),
              "q and k must be floating point, got ", q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(!symmetric || k.size(0) == q.size(0), "symmetric needs as many rows in k as in q, got ", k.size(0),
              " and ", q.size(0));
  const auto acc = accumulation_dtype(q, k);
  Inputs in{normalize_rows(q, acc, normalize), normalize_rows(k, acc, normalize), {}, q.size(0), k.size(0), 0};
  in.qs = in.q.rows * scale;
  in.block = row_block(in.n, in.m, at::elementSize(acc));
  return in;
}

at::Tensor input_grad(at::Tensor d_hat, const Normalized& x, const at::Tensor& like) {
  return normalize_backward(std::move(d_hat), x).to(like.scalar_type()).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets, double scale, bool normalize,
    bool symmetric) {
  Inputs in = prepare(q, k, scale, normalize, symmetric);
  const auto opts = in.qs.options();
  at::Tensor row_lse = at::empty({in.n}, opts), row_loss = at::empty({in.n}, opts);
  at::Tensor col_max = at::full({symmetric ? in.m : 0}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor col_other = at::zeros({symmetric ? in.m : 0}, opts);
  at::Tensor diagonal = at::empty({symmetric ? in.m : 0}, opts);
  at::Tensor tgt = checked_targets(targets, in.n, in.m);
  at::Tensor z = at::empty({in.block, in.m}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.qs.scalar_type(), "contrastive_forward", [&] {
    for (int64_t start = 0; start < in.n; start += in.block) {
      const int64_t rows = std::min(in.block, in.n - start);
      at::Tensor zb = z.narrow(0, 0, rows);
      at::mm_out(zb, in.qs.narrow(0, start, rows), in.k.rows.t());
      if (symmetric) {
        merge_columns(zb.data_ptr<scalar_t>(), rows, in.m, start, col_max.data_ptr<scalar_t>(),
                      col_other.data_ptr<scalar_t>(), diagonal.data_ptr<scalar_t>());
      }
      row_epilogue(zb.data_ptr<scalar_t>(), rows, in.m, tgt.data_ptr<int64_t>() + start,
                   row_lse.data_ptr<scalar_t>() + start, row_loss.data_ptr<scalar_t>() + start, false);
    }
  });
  if (!symmetric) return {row_loss, at::empty({0}, opts), row_lse, at::empty({0}, opts)};
  // symmetric: M == N and column j's positive is row j.
  at::Tensor shifted = diagonal - col_max;
  at::Tensor weight = shifted.exp();
  at::Tensor col_lse = col_max + (weight + col_other).log();
  at::Tensor col_loss = at::where(weight >= col_other, (col_other / weight).log1p(), (weight + col_other).log() - shifted);
  return {row_loss, col_loss, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_with_grad(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets, double scale, bool normalize,
    bool need_q, bool need_k) {
  Inputs in = prepare(q, k, scale, normalize, false);
  const auto opts = in.qs.options();
  at::Tensor row_lse = at::empty({in.n}, opts), row_loss = at::empty({in.n}, opts);
  at::Tensor dq = need_q ? at::empty({in.n, q.size(1)}, opts) : at::empty({0}, opts);
  at::Tensor dk = need_k ? at::zeros({in.m, k.size(1)}, opts) : at::empty({0}, opts);
  at::Tensor tgt = checked_targets(targets, in.n, in.m);
  at::Tensor z = at::empty({in.block, in.m}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.qs.scalar_type(), "contrastive_forward_with_grad", [&] {
    for (int64_t start = 0; start < in.n; start += in.block) {
      const int64_t rows = std::min(in.block, in.n - start);
      at::Tensor zb = z.narrow(0, 0, rows);
      at::mm_out(zb, in.qs.narrow(0, start, rows), in.k.rows.t());
      row_epilogue(zb.data_ptr<scalar_t>(), rows, in.m, tgt.data_ptr<int64_t>() + start,
                   row_lse.data_ptr<scalar_t>() + start, row_loss.data_ptr<scalar_t>() + start, true);
      if (need_q) {
        at::Tensor out = dq.narrow(0, start, rows);
        at::mm_out(out, zb, in.k.rows);
      }
      if (need_k) dk.addmm_(zb.t(), in.qs.narrow(0, start, rows));
    }
  });
  if (need_q) dq = input_grad(dq.mul_(scale), in.q, dq);
  if (need_k) dk = input_grad(dk, in.k, dk);
  return {row_loss.sum(), dq, dk};
}

std::tuple<at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& targets, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_loss, const at::Tensor& col_loss, double scale, bool normalize, bool symmetric,
    bool need_q, bool need_k) {
  Inputs in = prepare(q, k, scale, normalize, symmetric);
  check_vector(grad_row, "grad_row", in.n);
  check_vector(row_lse, "row_lse", in.n);
  check_vector(row_loss, "row_loss", in.n);
  if (symmetric) {
    check_vector(grad_col, "grad_col", in.m);
    check_vector(col_lse, "col_lse", in.m);
    check_vector(col_loss, "col_loss", in.m);
  }
  const auto opts = in.qs.options();
  at::Tensor g_row = grad_row.to(opts.dtype()).contiguous();
  at::Tensor g_col = symmetric ? grad_col.to(opts.dtype()).contiguous() : at::Tensor();
  at::Tensor r_lse = row_lse.to(opts.dtype()).contiguous();
  at::Tensor c_lse = symmetric ? col_lse.to(opts.dtype()).contiguous() : at::Tensor();
  at::Tensor r_loss = row_loss.to(opts.dtype()).contiguous();
  at::Tensor c_loss = symmetric ? col_loss.to(opts.dtype()).contiguous() : at::Tensor();
  at::Tensor tgt = checked_targets(targets, in.n, in.m);
  at::Tensor dq = need_q ? at::empty({in.n, q.size(1)}, opts) : at::Tensor();
  at::Tensor dk = need_k ? at::zeros({in.m, k.size(1)}, opts) : at::Tensor();
  at::Tensor z = at::empty({in.block, in.m}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.qs.scalar_type(), "contrastive_backward", [&] {
    const scalar_t* lse = r_lse.data_ptr<scalar_t>();
    const scalar_t* g = g_row.data_ptr<scalar_t>();
    const int64_t* t = tgt.data_ptr<int64_t>();
    const int64_t m = in.m;
    for (int64_t start = 0; start < in.n; start += in.block) {
      const int64_t rows = std::min(in.block, in.n - start);
      at::Tensor zb = z.narrow(0, 0, rows);
      at::mm_out(zb, in.qs.narrow(0, start, rows), in.k.rows.t());
      grad_epilogue(zb.data_ptr<scalar_t>(), rows, m, start, t, lse, r_loss.data_ptr<scalar_t>(), g,
                    symmetric ? c_lse.data_ptr<scalar_t>() : nullptr,
                    symmetric ? c_loss.data_ptr<scalar_t>() : nullptr,
                    symmetric ? g_col.data_ptr<scalar_t>() : nullptr);
      if (need_q) {
        at::Tensor out = dq.narrow(0, start, rows);
        at::mm_out(out, zb, in.k.rows);
      }
      if (need_k) dk.addmm_(zb.t(), in.qs.narrow(0, start, rows));
    }
  });
  at::Tensor dq_out = need_q ? input_grad(dq.mul_(scale), in.q, q) : at::empty({0}, q.options());
  at::Tensor dk_out = need_k ? input_grad(dk, in.k, k) : at::empty({0}, k.options());
  return {dq_out, dk_out};
}

}  // namespace cpu
}  // namespace mmkd
