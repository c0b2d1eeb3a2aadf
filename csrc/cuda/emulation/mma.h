// CPU emulation of the part of <mma.h> (nvcuda::wmma: 16×16×16 half and bfloat16, 16×16×8 tf32,
// float accumulators) that csrc/cuda/tiles.cuh uses; see cuda_emulation.h. Every lane of a warp
// holds the whole 16×16 fragment (the warp's lanes compute the same values redundantly); lane 0
// alone stores it. Loads
// and stores check the hardware's rules, 32-byte aligned pointers and leading dimensions that are
// multiples of 16 bytes, and report a breach (mmkd_emulation::report).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};  // float in memory, 10 bits of mantissa in the product
}  // namespace precision

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "only 16x16x16 and 16x16x8 fragments are emulated");
  float v[16][16];  // (row, column) of the fragment's matrix, as float (K columns of A, K rows of B used)
};

// cvt.rna.tf32.f32: float rounded to 10 bits of mantissa, to nearest, ties away from zero.
inline float __float_to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;  // not Inf or NaN
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

namespace detail {

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The element type in memory of a fragment of type T.
template <typename T>
struct Stored {
  using type = T;
};
template <>
struct Stored<precision::tf32> {
  using type = float;
};

template <typename T>
void check(const T* pointer, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) mmkd_emulation::report(what);
}

}  // namespace detail

template <int K, typename T>
void fill_fragment(fragment<accumulator, 16, 16, K, T>& f, float value) {
  for (auto& row : f.v)
    for (float& x : row) x = value;
}

// matrix_a (m, k): row_major at p[m·ldm + k], col_major at p[k·ldm + m].
template <int K, typename T, typename Layout>
void load_matrix_sync(fragment<matrix_a, 16, 16, K, T, Layout>& f, const typename detail::Stored<T>::type* p,
                      unsigned ldm) {
  detail::check(p, ldm, "wmma::load_matrix_sync(matrix_a): pointer not 32-byte aligned or bad ldm");
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < K; ++k)
      f.v[m][k] = detail::to_float(std::is_same<Layout, row_major>::value ? p[m * ldm + k] : p[k * ldm + m]);
}

// matrix_b (k, n): row_major at p[k·ldm + n], col_major at p[n·ldm + k].
template <int K, typename T, typename Layout>
void load_matrix_sync(fragment<matrix_b, 16, 16, K, T, Layout>& f, const typename detail::Stored<T>::type* p,
                      unsigned ldm) {
  detail::check(p, ldm, "wmma::load_matrix_sync(matrix_b): pointer not 32-byte aligned or bad ldm");
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < 16; ++n)
      f.v[k][n] = detail::to_float(std::is_same<Layout, row_major>::value ? p[k * ldm + n] : p[n * ldm + k]);
}

template <int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, K, T, LayoutB>& b, const fragment<accumulator, 16, 16, K, float>& c) {
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[m][n];
      for (int k = 0; k < K; ++k) acc += a.v[m][k] * b.v[k][n];
      out[m][n] = acc;
    }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) d.v[m][n] = out[m][n];
}

template <int K>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t layout) {
  detail::check(p, ldm, "wmma::store_matrix_sync: pointer not 32-byte aligned or bad ldm");
  if (threadIdx.x % 32 != 0) return;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) (layout == mem_row_major ? p[m * ldm + n] : p[n * ldm + m]) = f.v[m][n];
}

}  // namespace wmma
}  // namespace nvcuda
