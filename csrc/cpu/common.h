// What the CPU kernels share: the accumulation dtype, row blocks, row normalization and its
// backward, and an exp that the compiler vectorizes (std::exp on float is a scalar call, and the
// epilogues are exp-bound once the GEMMs go through MKL).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

// at::parallel_for (ATen/ParallelOpenMP.h) runs its body once, on the calling thread, unless this
// file is compiled with OpenMP: every epilogue would then use one core while MKL's GEMMs use all.
#ifndef _OPENMP
#error "csrc/cpu needs OpenMP for at::parallel_for: compile with -fopenmp (mmkd_kernels/native_build.py)"
#endif

namespace mmkd {
namespace cpu {

constexpr double kEps = 1e-8;

// The epilogue loops vectorize only if every function in them is inlined. GCC's inliner stops
// inlining in a large translation unit (it declined fast_exp in structure.cpp's kl weights loop,
// which then stayed scalar), so the small math below insists.
#define MMKD_ALWAYS_INLINE inline __attribute__((always_inline))

// float64 if any input is float64, else float32 (half inputs are computed in float32).
inline at::ScalarType accumulation_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                             : at::kFloat;
}

// Rows per block: a (block × n_cols) tile of about 32 MiB, and never fewer than 256 rows (nor more
// than the n_rows there are: a few rows against many columns need no 256-row tile). The
// row count is the inner dimension of the column-side GEMM (dk += Pᵀ Q_b, dx += dGᵀ x̂_b), which
// MKL runs far below its rate when it is small (native kl tile at N = 16384 went from 11.1 s to
// 6.44 s: benchmarks/results/cpu-amd-epyc-2026-11-24-n16384.md and the -n16384-kl.md of commit
// 9c4be31). Extra memory stays O(N):
// 256·n_cols floats at most beyond the budget.
inline int64_t row_block(int64_t n_rows, int64_t n_cols, int64_t element_size) {
  const int64_t budget = (int64_t{32} << 20) / element_size;
  const int64_t rows = budget / std::max<int64_t>(n_cols, 1);
  return std::min(std::max<int64_t>(256, std::min<int64_t>(rows, 1024)), std::max<int64_t>(n_rows, 1));
}

struct Normalized {
  at::Tensor rows;   // x̂ (N, D) in the accumulation dtype, contiguous
  at::Tensor norms;  // max(‖x‖, eps) (N,), undefined when not normalizing
};

inline Normalized normalize_rows(const at::Tensor& x, at::ScalarType acc, bool normalize) {
  at::Tensor rows = x.to(acc).contiguous();
  if (!normalize) return {rows, at::Tensor()};
  at::Tensor norms = at::linalg_vector_norm(rows, 2, {1}).clamp_min_(kEps);
  return {rows / norms.unsqueeze(1), norms};
}

// dx from dx̂, in place: (dx̂ − x̂ (x̂·dx̂)) / ‖x‖ where ‖x‖ > eps, else dx̂ / eps.
inline at::Tensor normalize_backward(at::Tensor dx_hat, const Normalized& x) {
  if (!x.norms.defined()) return dx_hat;
  at::Tensor radial = (x.rows * dx_hat).sum(1) * x.norms.gt(kEps).to(dx_hat.scalar_type());
  return dx_hat.sub_(x.rows * radial.unsqueeze(1)).div_(x.norms.unsqueeze(1));
}

// exp(x) for float, vectorizable: 2^n · p(r) with x = n·ln2 + r, |r| ≤ ln2/2, a degree-6
// polynomial (Cephes' expf coefficients, ~1 ulp). NaN stays NaN, −inf and x < −87.3 give 0.
MMKD_ALWAYS_INLINE float fast_exp(float x) {
  const float clamped = x > 88.0f ? 88.0f : (x < -87.3f ? -87.3f : x);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  static_assert(sizeof(scale) == sizeof(bits), "float is 32 bits");
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const float result = x < -87.3f ? 0.0f : p * scale;
  return x != x ? x : (x > 88.0f ? std::numeric_limits<float>::infinity() : result);
}

inline double fast_exp(double x) { return std::exp(x); }

// 1/k! for k = 0 .. kLast, at compile time.
template <typename T, int kLast>
struct InverseFactorials {
  T c[kLast + 1];
  constexpr InverseFactorials() : c() {
    T factorial = 1;
    for (int k = 0; k <= kLast; ++k) {
      if (k > 1) factorial *= T(k);
      c[k] = T(1) / factorial;
    }
  }
};

// x² Σ_{k≥2} x^{k−2}/k!, the Taylor series of e^x − 1 − x, for |x| < 1/2 (the caller passes 0
// elsewhere). It stops where its next term is below the type's rounding at |x| = 1/2.
template <typename T>
MMKD_ALWAYS_INLINE T expm1_minus_x_series(T x) {
  constexpr int kLast = sizeof(T) == 4 ? 10 : 18;
  static constexpr InverseFactorials<T, kLast> inv{};
  T sum = inv.c[kLast];
  for (int k = kLast - 1; k >= 2; --k) sum = sum * x + inv.c[k];
  return x * x * sum;
}

// e^x − 1 − x (≥ 0) to a few ulps, vectorizable: the series where |x| < 1/2 (e^x − 1 − x would
// cancel most digits of a small x's x²/2), fast_exp(x) − 1 − x elsewhere. Both arms are computed
// and one selected: a select of two plain values is what GCC turns into a vector blend, where a
// call in an arm of a conditional kept the loops around fast_expm1 scalar.
template <typename T>
MMKD_ALWAYS_INLINE T expm1_minus_x(T x) {
  const bool small = std::abs(x) < T(0.5);
  const T series = expm1_minus_x_series(small ? x : T(0));
  const T direct = (fast_exp(x) - T(1)) - x;
  return small ? series : direct;
}

// e^x − 1 to a few ulps, vectorizable: x + the series where |x| < 1/2, fast_exp(x) − 1 elsewhere.
template <typename T>
MMKD_ALWAYS_INLINE T fast_expm1(T x) {
  const bool small = std::abs(x) < T(0.5);
  const T series = x + expm1_minus_x_series(small ? x : T(0));
  const T direct = fast_exp(x) - T(1);
  return small ? series : direct;
}

// {Σ f(j), Σ g(j)} over [begin, end) in one loop, each in two levels: partial sums over chunks of
// 256 terms in the function's own type, a vectorized reduction (one float per lane), then the
// chunks in double. The error stays about that of 256/lanes terms summed in order (a whole float32
// row of 16K terms loses sqrt(16K)·eps), at the speed of a float reduction: a double accumulator
// inside the vectorized loop made the epilogues 7x slower here (AVX-512, GCC). Two sums that read
// the same row take one pass over it.
template <typename F, typename G>
inline std::pair<double, double> blocked_sums(int64_t begin, int64_t end, F f, G g) {
  using f_t = decltype(f(begin));
  using g_t = decltype(g(begin));
  constexpr int64_t kChunk = 256;
  double total_f = 0, total_g = 0;
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const int64_t stop = std::min(chunk + kChunk, end);
    f_t partial_f = 0;
    g_t partial_g = 0;
#pragma omp simd reduction(+ : partial_f, partial_g)
    for (int64_t j = chunk; j < stop; ++j) {
      partial_f += f(j);
      partial_g += g(j);
    }
    total_f += partial_f;
    total_g += partial_g;
  }
  return {total_f, total_g};
}

// Σ_{j ∈ [begin, end)} f(j), as blocked_sums (the compiler drops the empty second sum).
template <typename F>
inline double blocked_sum(int64_t begin, int64_t end, F f) {
  using value_t = decltype(f(begin));
  return blocked_sums(begin, end, f, [](int64_t) { return value_t(0); }).first;
}

// blocked_sum over [0, n) without the term `skip` (a target or a diagonal): two vectorized ranges.
template <typename F>
inline double blocked_sum_except(int64_t n, int64_t skip, F f) {
  return blocked_sum(0, skip, f) + blocked_sum(skip + 1, n, f);
}

}  // namespace cpu
}  // namespace mmkd
