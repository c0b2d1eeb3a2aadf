"""Which backends exist, which can run on a device, and which one ``backend="auto"`` picks."""

import importlib
import importlib.util
import os

import torch

BACKENDS = ("reference", "chunked", "triton", "native")

# The torch.library namespace of each backend's custom ops (ops.py). The reference backend is
# plain PyTorch autograd and needs none: torch.compile traces it as it is.
NAMESPACES = {"chunked": "mmkd_chunked", "triton": "mmkd_triton", "native": "mmkd_native"}

# Why an optional backend's module failed to import (then it is unavailable, and says so).
_IMPORT_ERRORS: dict[str, str] = {}

# Looked up once, here: the checks below run inside functions that torch.compile traces, and
# torch 2.11's dynamo refuses to trace importlib.util.find_spec (a graph break, an error under
# fullgraph=True).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def load_optional_backends() -> None:
    """Import the optional backends' modules, which register their ops. At import time of the
    library, never inside a traced function (torch.compile cannot trace an import)."""
    from . import native

    native.load(build=False)  # the built extension only: a build just in time waits for a request
    if not _TRITON_FOUND:
        return
    try:
        importlib.import_module("mmkd_kernels.triton")
    except Exception as error:  # a broken triton install: the backend reports it when asked for
        _IMPORT_ERRORS["triton"] = f"backend='triton' failed to import: {type(error).__name__}: {error}"


def _triton_reason(device: torch.device | None, dtype: torch.dtype | None) -> str | None:
    if not _TRITON_FOUND:
        return "backend='triton' needs the triton package (pip install triton)"
    if "triton" in _IMPORT_ERRORS:
        return _IMPORT_ERRORS["triton"]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device is None:
        if not (interpreted or torch.cuda.is_available()):
            return "backend='triton' needs CUDA or TRITON_INTERPRET=1"
    elif device.type != "cuda" and not (interpreted and device.type == "cpu"):
        return f"backend='triton' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device} tensors"
    if dtype == torch.float64:
        return "backend='triton' computes float32, float16 and bfloat16 inputs; for float64 use 'chunked' or 'reference'"
    return None


def _native_reason(device: torch.device | None, dtype: torch.dtype | None, build: bool) -> str | None:
    from . import native

    reason = native.load(build)
    if reason is not None:
        return reason
    if device is not None and device.type == "cuda":
        if not native.has_cuda_kernels():
            return "backend='native' was built without CUDA kernels (rebuild with MMKD_BUILD_CUDA=1)"
        if dtype == torch.float64:
            return "backend='native' computes float32, float16 and bfloat16 on CUDA; for float64 use 'chunked'"
    elif device is not None and device.type != "cpu":
        return f"backend='native' runs on CPU and CUDA tensors, got {device} tensors"
    return None


def unavailable_reason(name: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Why backend ``name`` cannot run (for tensors on ``device`` of ``dtype``, when given), or None."""
    if name in ("reference", "chunked"):
        return None
    if name == "triton":
        return _triton_reason(device, dtype)
    if name == "native":
        return _native_reason(device, dtype, build=False)
    return f"backend must be one of {', '.join(map(repr, BACKENDS + ('auto',)))}, got {name!r}"


def available_backends() -> list[str]:
    """The backends that can run on some device of this machine, in order of preference last."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend to run for ``dtype`` tensors on ``device``; ValueError saying why one cannot run.

    ``auto`` never picks the O(N²)-memory reference: it prefers the fused backends of the device and
    falls back to ``chunked``, which runs everywhere. (It never picks the Triton interpreter.)
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        preferred = ("triton", "native", "chunked") if device.type == "cuda" else ("native", "chunked")
        backend = next(name for name in preferred if unavailable_reason(name, device, dtype) is None)
    else:
        # Asked for by name, the native extension is built now if it was not at install.
        reason = (_native_reason(device, dtype, build=True) if backend == "native"
                  else unavailable_reason(backend, device, dtype))
        if reason is not None:
            raise ValueError(reason)
    return backend
