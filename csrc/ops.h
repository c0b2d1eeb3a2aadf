// The C++ side of the ops of mmkd_kernels/ops.py (SCHEMAS): one declaration per op, implemented
// for CPU in namespace mmkd::cpu (csrc/cpu/) and for CUDA in namespace mmkd::cuda (csrc/cuda/).
// Semantics are those of the Python backends (mmkd_kernels/chunked.py): per-row or summed losses
// in the accumulation dtype (float32; float64 for float64 inputs on CPU), gradients of the inputs,
// and an empty (0,) tensor where a gradient is not needed or a loss is not symmetric.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#define MMKD_DECLARE_OPS                                                                          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_forward(                  \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets, double scale,           \
      bool normalize, bool symmetric);                                                             \
  std::tuple<at::Tensor, at::Tensor> contrastive_backward(                                         \
      const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q,                 \
      const at::Tensor& k, const at::Tensor& targets, const at::Tensor& row_lse,                   \
      const at::Tensor& col_lse, const at::Tensor& row_loss, const at::Tensor& col_loss,          \
      double scale, bool normalize, bool symmetric, bool need_q, bool need_k);                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_with_grad(                    \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets, double scale,           \
      bool normalize, bool need_q, bool need_k);                                                   \
  at::Tensor structure_tile_forward(const at::Tensor& s, const at::Tensor& t,                      \
                                    c10::string_view kind, double scale, bool normalize,           \
                                    int64_t row_start, int64_t row_count);                         \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> structure_tile_forward_with_grad(                 \
      const at::Tensor& s, const at::Tensor& t, c10::string_view kind, double scale,               \
      bool normalize, int64_t row_start, int64_t row_count, bool need_s, bool need_t);

namespace mmkd {
namespace cpu {
MMKD_DECLARE_OPS
}  // namespace cpu
namespace cuda {
MMKD_DECLARE_OPS
}  // namespace cuda
}  // namespace mmkd
