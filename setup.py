"""Build script of the compiled extension mmkd_kernels._C (the `native` backend, csrc/).

The package metadata lives in pyproject.toml. Build switches (environment variables):

| variable            | default  | effect                                                              |
|---------------------|----------|---------------------------------------------------------------------|
| MMKD_BUILD_NATIVE   | 1        | 0: build no extension (from a source checkout, mmkd_kernels.native builds it on first use) |
| MMKD_BUILD_CUDA     | auto     | 1: build the CUDA kernels too (or stop with the reason); 0: CPU only; auto: when torch has CUDA and the CUDA toolkit (nvcc, headers) is found (native_build.cuda_choice) |
| MMKD_CPU_ARCH       | native   | the -march of the CPU kernels (e.g. x86-64-v3 for a portable build)  |
| MMKD_CUDA_ARCH      | (GPU)    | TORCH_CUDA_ARCH_LIST of the CUDA kernels; unset: the present GPU's (sm_80+), else 9.0+PTX (H100, and PTX for newer GPUs) |
| MAX_JOBS            | (cores)  | parallel compile jobs (torch.utils.cpp_extension)                   |
| MMKD_SANITIZE       | (unset)  | address: build with AddressSanitizer (run with libasan in LD_PRELOAD) |
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup


def _native_build():
    """mmkd_kernels/native_build.py, loaded by path: importing the package would import torch,
    triton and the ops before the extension exists."""
    path = Path(__file__).resolve().parent / "mmkd_kernels" / "native_build.py"
    spec = importlib.util.spec_from_file_location("mmkd_native_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    switch = os.environ.get("MMKD_BUILD_NATIVE", "1")
    if switch not in ("0", "1"):
        raise SystemExit(f"MMKD_BUILD_NATIVE must be 0 or 1, got {switch!r}")
    if switch == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    build = _native_build()
    try:
        with_cuda, note = build.cuda_choice(torch.__version__, torch.version.cuda, CUDA_HOME)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if note is not None:
        print(f"mmkd-kernels: {note}", file=sys.stderr)
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = build.cuda_arch(
            torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
        ext = CUDAExtension("mmkd_kernels._C", build.sources(with_cuda=True, relative=True),
                            extra_compile_args={"cxx": build.cxx_flags(True), "nvcc": build.nvcc_flags()},
                            extra_link_args=build.link_flags())
    else:
        ext = CppExtension("mmkd_kernels._C", build.sources(with_cuda=False, relative=True),
                           extra_compile_args={"cxx": build.cxx_flags(False)}, extra_link_args=build.link_flags())
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
