"""Which backends exist, which can run on a device, and which one ``backend="auto"`` picks."""

import torch

BACKENDS = ("reference", "chunked", "triton", "native")

# The torch.library namespace of each backend's custom ops (ops.py). The reference backend is
# plain PyTorch autograd and needs none: torch.compile traces it as it is.
NAMESPACES = {"chunked": "mmkd_chunked"}


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why backend ``name`` cannot run (on ``device``, when given), or None when it can."""
    if name in ("reference", "chunked"):
        return None
    if name == "triton":
        return "backend='triton' is not part of this version of mmkd_kernels yet (its kernels are not written)"
    if name == "native":
        return "backend='native' is not part of this version of mmkd_kernels yet (csrc/ is not written)"
    return f"backend must be one of {', '.join(map(repr, BACKENDS + ('auto',)))}, got {name!r}"


def available_backends() -> list[str]:
    """The backends that can run on some device of this machine, in order of preference last."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def resolve(backend: str, device: torch.device) -> str:
    """The backend to run for tensors on ``device``; raises ValueError saying why one cannot run.

    ``auto`` never picks the O(N²)-memory reference: it prefers the fused backends of the device and
    falls back to ``chunked``, which runs everywhere.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        preferred = ("triton", "native", "chunked") if device.type == "cuda" else ("native", "chunked")
        return next(name for name in preferred if unavailable_reason(name, device) is None)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(reason)
    return backend
