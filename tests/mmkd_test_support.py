"""Shared test helpers: the targets (backend, device), fresh inputs, relative errors, tolerances.

A module of its own name, not conftest: tests/train/ has a conftest.py too, and a process spawned
by a test (tests/test_distributed.py) imports whichever ``conftest`` comes first on its path.
"""

import os
from typing import NamedTuple

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before the
# kernels are defined (at import).
INTERPRETED = not torch.cuda.is_available()
if INTERPRETED:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, each of the tables' hundreds of shapes would be a new autotuning key, each timing every
# config: the tests check numbers, so each kernel keeps its first config per dtype (the config
# counts that change the code run in test_triton_configs.py).
os.environ.setdefault("MMKD_TRITON_AUTOTUNE", "0")

import mmkd_kernels as mk  # noqa: E402

if INTERPRETED:
    from benchmarks import triton_interpreter_repairs  # noqa: E402

    # The interpreter's bfloat16 dot multiplies bit patterns; mended here so bfloat16 runs too.
    triton_interpreter_repairs.install()

# DESIGN §4: relative error ‖out − ref‖ / ‖ref‖ against float64 on the same rounded inputs.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# Every backend that can run here, but the reference (the ground truth itself).
FAST_BACKENDS = [b for b in mk.available_backends() if b != "reference"]


class Target(NamedTuple):
    """A backend and the device its inputs live on; the reference always runs on the CPU."""

    backend: str
    device: str

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}"


def _targets() -> list[Target]:
    cpu = [Target(b, "cpu") for b in FAST_BACKENDS if b != "triton" or INTERPRETED]
    return cpu + [Target(b, "cuda") for b in ("chunked", "triton", "native")]


# Every (backend, device) the shared tables run. The CUDA ones are always collected, marked gpu, and
# skipped with their reason where they cannot run (conftest.py; cuda_skip_reason).
TARGETS = _targets()


def cuda_skip_reason(target: Target) -> str | None:
    """Why a CUDA target cannot run here, or None (CPU targets always run)."""
    if target.device != "cuda":
        return None
    if not torch.cuda.is_available():
        return "needs a CUDA device; none here"
    from mmkd_kernels import native

    if target.backend == "native" and not native.has_cuda_kernels():
        return "mmkd_kernels._C has no CUDA kernels (test_the_installed_backends_are_all_here says why that fails)"
    return None


# The interpreter runs a program per block in Python: N·M·D beyond this takes tens of seconds.
INTERPRETER_MAX_WORK = 300 * 300 * 128


def runs(target: Target, dtype: torch.dtype, work: int) -> bool:
    """Whether a case belongs in a target's table (cases are left out, never skipped): triton and
    the CUDA kernels compute no float64 (their refusal is tested in test_errors.py); under its
    interpreter triton is slow, so small sizes only (bfloat16 included: benchmarks/triton_interpreter_repairs.py
    mends the interpreter's bfloat16 dot, which DESIGN §4 had left to a GPU)."""
    if dtype == torch.float64 and (target.backend == "triton" or (target.backend == "native" and target.device == "cuda")):
        return False
    if target.backend == "triton" and target.device == "cpu":
        if work > INTERPRETER_MAX_WORK:
            LEFT_OUT_OF_THE_INTERPRETER.append(work)
            return False
    return True


# The cases runs() left out for the interpreter's size limit (the conftest's summary counts them).
LEFT_OUT_OF_THE_INTERPRETER: list[int] = []


# A case whose truth is exactly zero (D = 1 with normalization has zero gradient; one column gives
# a zero loss) leaves float64 a residue near 1e-17 and float32 one near 1e-8: their ratio says
# nothing. Such cases pass ZERO_TRUTH as rel_err's floor, an absolute check of that size.
ZERO_TRUTH = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """‖out − ref‖ / max(‖ref‖, floor) in float64; NaN anywhere gives inf. ``floor``: ZERO_TRUTH
    where the truth is exactly zero; the default only keeps 0/0 out."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return float("inf")
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / max(scale, floor)


def randn(*shape, seed: int, dtype=torch.float32, layout: str = "contiguous", shift: float = 0.0,
          device: str = "cpu") -> torch.Tensor:
    """Fresh random rows (N, D) of ``dtype`` on ``device``; ``layout`` "transposed" or "strided"
    gives a non-contiguous view with the same values' distribution. ``shift`` adds a common offset
    to every row (real embeddings share a large mean direction)."""
    gen = torch.Generator().manual_seed(seed)
    n, d = shape
    if layout == "transposed":
        x = (torch.randn(d, n, generator=gen) + shift).to(device=device, dtype=dtype).T
    elif layout == "strided":
        x = (torch.randn(n, 2 * d, generator=gen) + shift).to(device=device, dtype=dtype)[:, ::2]
    else:
        x = (torch.randn(n, d, generator=gen) + shift).to(device=device, dtype=dtype)
    return x


# The first element offset that int32 cannot hold.
INT32_END = 2**31


def far_apart(n: int, widths: tuple[int, ...], *, seed: int, dtype=torch.float16, device: str = "cpu"):
    """Fresh random (n, w) views, one per width, of a single storage whose rows lie INT32_END / (n − 1)
    elements apart (n ≥ 2): each view's last row starts 2^31 elements past its first, where int32
    address math wraps. The storage (2^31 elements and more) is allocated, never written but for the
    rows; one for all the views, as GPU tests share the device's memory. A test that calls this takes
    the ``cuda_memory_released`` fixture (conftest.py)."""
    gen = torch.Generator().manual_seed(seed)
    row_stride = max(-(-INT32_END // (n - 1)), sum(widths))
    # An input's storage, not an output: the NaN poisoning (conftest.py) would write, and so make
    # resident, all of its gigabytes.
    poisoning = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        storage = torch.empty(n, row_stride, device=device, dtype=dtype)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = poisoning
    views, start = [], 0
    for width in widths:
        view = storage[:, start:start + width]
        view.copy_(torch.randn(n, width, generator=gen))
        views.append(view)
        start += width
    return views


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A leaf view of x that records gradients (keeps x's strides)."""
    return x.detach().requires_grad_(True)


def grads_of(value: torch.Tensor, inputs, grad_output: torch.Tensor | None = None):
    """Gradients of value (scalar, or weighted by grad_output) with respect to each input."""
    grads = torch.autograd.grad(value, inputs, grad_outputs=grad_output, allow_unused=True)
    return [g for g in grads]
