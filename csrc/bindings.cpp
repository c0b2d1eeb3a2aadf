// mmkd_kernels._C: the `native` backend's ops, torch.ops.mmkd_native.*. The schemas are those of
// mmkd_kernels/ops.py SCHEMAS (one contract for every backend; tests/test_native.py checks they
// agree); the CPU kernels are registered here, the CUDA ones in cuda/ops_cuda.cpp when built with
// CUDA. Autograd and fake (shape) functions are registered from Python, shared with the other
// backends (mmkd_kernels/ops.py register_backend). The gram algorithm is plain ATen matmuls and is
// defined from Python too (mmkd_kernels/native.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// The kind and SHA-256 of the sources this extension was built from, cpu_<hex> or cuda_<hex>
// (mmkd_kernels/native_build.py source_digest, passed by the build as -DMMKD_SOURCE_DIGEST).
// native.py reads it from the file's bytes, after the marker, before loading: an extension built
// from older sources is never loaded.
#ifndef MMKD_SOURCE_DIGEST
#error "build with -DMMKD_SOURCE_DIGEST=<kind>_<hex> (mmkd_kernels/native_build.py cxx_flags)"
#endif
#define MMKD_STRING(x) #x
#define MMKD_EXPANDED_STRING(x) MMKD_STRING(x)
static const char kSourceDigest[] = "MMKD_SOURCE_DIGEST:" MMKD_EXPANDED_STRING(MMKD_SOURCE_DIGEST);

extern "C" {
// Importing mmkd_kernels._C as a Python module runs the registrations below. The module's
// source_digest (the digest alone) keeps the string in the library.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "source_digest", kSourceDigest + sizeof("MMKD_SOURCE_DIGEST:") - 1) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(mmkd_native, m) {
  m.def("contrastive_forward(Tensor q, Tensor k, Tensor targets, float scale, bool normalize, bool symmetric)"
        " -> (Tensor row_loss, Tensor col_loss, Tensor row_lse, Tensor col_lse)");
  m.def("contrastive_backward(Tensor grad_row, Tensor grad_col, Tensor q, Tensor k, Tensor targets, Tensor row_lse,"
        " Tensor col_lse, Tensor row_loss, Tensor col_loss, float scale, bool normalize, bool symmetric,"
        " bool need_q, bool need_k)"
        " -> (Tensor dq, Tensor dk)");
  m.def("contrastive_forward_with_grad(Tensor q, Tensor k, Tensor targets, float scale, bool normalize,"
        " bool need_q, bool need_k) -> (Tensor loss_sum, Tensor dq, Tensor dk)");
  m.def("structure_tile_forward(Tensor s, Tensor t, str kind, float scale, bool normalize, int row_start,"
        " int row_count) -> Tensor");
  m.def("structure_tile_forward_with_grad(Tensor s, Tensor t, str kind, float scale, bool normalize,"
        " int row_start, int row_count, bool need_s, bool need_t) -> (Tensor loss_sum, Tensor ds, Tensor dt)");
}

TORCH_LIBRARY_IMPL(mmkd_native, CPU, m) {
  m.impl("contrastive_forward", &mmkd::cpu::contrastive_forward);
  m.impl("contrastive_backward", &mmkd::cpu::contrastive_backward);
  m.impl("contrastive_forward_with_grad", &mmkd::cpu::contrastive_forward_with_grad);
  m.impl("structure_tile_forward", &mmkd::cpu::structure_tile_forward);
  m.impl("structure_tile_forward_with_grad", &mmkd::cpu::structure_tile_forward_with_grad);
}
