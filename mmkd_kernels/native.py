"""The `native` backend: loads mmkd_kernels._C (C++ CPU kernels, CUDA C++ kernels when built
with CUDA), or builds it just in time from csrc/ with ninja when the package was installed
without it or it was built from other sources than csrc/ holds now (native_build.source_digest),
and registers the shared fake and autograd functions on its ops.

The gram algorithm's D×D products are BLAS matmuls whichever backend runs them, so the native
namespace defines its gram ops from the same code as the chunked backend.
"""

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from . import chunked, ops

NAMESPACE = "mmkd_native"
_state: dict = {}


def _jit_build() -> None:
    """torch.utils.cpp_extension.load of csrc/ (CPU kernels; CUDA too where torch and nvcc have it)."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    from .native_build import CSRC, cuda_arch, cuda_choice, cxx_flags, link_flags, nvcc_flags, sources

    if not CSRC.is_dir():
        raise RuntimeError(f"mmkd_kernels._C is not built and its sources are not at {CSRC} "
                           "(reinstall from a source checkout: pip install --no-build-isolation -e .)")
    # MMKD_BUILD_CUDA as for setup.py; under auto, only where a GPU could run the CUDA kernels.
    with_cuda, _ = cuda_choice(torch.__version__, torch.version.cuda, CUDA_HOME, torch.cuda.is_available())
    # torch reads the architectures from the environment: set for this build only, then restored.
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch(
            torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
    try:
        load(name=f"mmkd_native_{torch.__version__.replace('.', '_').replace('+', '_')}",
             sources=sources(with_cuda), extra_cflags=cxx_flags(with_cuda), extra_cuda_cflags=nvcc_flags(),
             extra_ldflags=link_flags(), is_python_module=False, verbose=False)
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def _stale_build() -> str | None:
    """Why the built mmkd_kernels._C must not be loaded: it was built from other sources than
    csrc/ holds now (edited since, outside `make`, which rebuilds). None where it is current, where
    there is no built one, or where there are no sources to compare (an installed wheel)."""
    from .native_build import CSRC, built_digest, digest_is_current

    if "mmkd_kernels._C" in sys.modules:  # loaded already (or stood in for by a test's own build)
        return None
    spec = importlib.util.find_spec("mmkd_kernels._C")
    if spec is None or spec.origin is None or not CSRC.is_dir():
        return None
    if digest_is_current(built_digest(Path(spec.origin))):
        return None
    return (f"{spec.origin} was built from other sources than {CSRC} holds now (rebuild it: make native, "
            "or pip install --no-build-isolation -e .)")


def load(build: bool) -> str | None:
    """Make torch.ops.mmkd_native usable: import the built extension or, with ``build``, compile
    it now (once per process; cached on disk by torch). Returns None, or why it cannot."""
    if "error" in _state or "loaded" in _state:
        return _state.get("error")
    if not build and "unbuilt" in _state:  # known since import: no import again inside a traced call
        return _state["unbuilt"]
    stale = _stale_build()
    try:
        if stale is not None:
            raise ImportError(stale)
        importlib.import_module("mmkd_kernels._C")
    except ImportError as missing:
        if not build:
            if stale is not None:
                _state["unbuilt"] = (f"backend='native' is out of date: {stale}; asking for it by name builds "
                                     "the current sources just in time")
                warnings.warn(_state["unbuilt"], RuntimeWarning, stacklevel=2)
            else:
                _state["unbuilt"] = f"backend='native' is not built ({missing}); asking for it by name builds it"
            return _state["unbuilt"]
        try:
            _jit_build()
        except Exception as error:  # compiler, ninja or sources missing: say which, once
            _state["error"] = f"backend='native' could not be built just in time: {type(error).__name__}: {error}"
            return _state["error"]
    ops.register_backend(NAMESPACE, {
        "structure_gram_forward": chunked.structure_gram_forward,
        "structure_gram_forward_with_grad": chunked.structure_gram_forward_with_grad,
    })
    _state["loaded"] = True
    return None


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels."""
    return "loaded" in _state and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::contrastive_forward", "CUDA")
