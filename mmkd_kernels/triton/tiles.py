"""What every Triton kernel here shares: the similarity tile, block sizes, and the host-side
normalization (inverse norms in, the normalization's backward as an N×D epilogue out)."""

import torch
import triton
import triton.language as tl

from ..normalization import normalize_backward, normalize_forward
from ..reference import EPS

# Block sizes. The interpreter (CI on CPU) runs each program and loop step in Python over numpy
# arrays, so fewer, larger blocks are much faster there (64 against 32: about 15x here).
# These are correct everywhere; tuning them on the GPU is owed (issue 4).
_GPU_BLOCKS = dict(BLOCK_A=64, BLOCK_B=64, BLOCK_D=64, BLOCK_DO=64)
_INTERPRETER_BLOCKS = dict(BLOCK_A=64, BLOCK_B=64, BLOCK_D=64, BLOCK_DO=64)


def check_dtypes(*tensors: torch.Tensor) -> None:
    """The kernels accumulate in float32: a float64 input would be silently rounded, so refuse it."""
    for x in tensors:
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"mmkd_triton ops take float32, float16 or bfloat16 inputs, got {x.dtype}")


def blocks(x: torch.Tensor) -> dict:
    return _GPU_BLOCKS if x.is_cuda else _INTERPRETER_BLOCKS


def precision(x: torch.Tensor) -> str:
    """Exact float32 dots for float32 inputs (DESIGN §4: TF32 only where the tolerance allows)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def inverse_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """1 / max(‖x_i‖, eps) in float32 (ones when not normalizing): the kernels scale by these
    instead of reading a normalized copy."""
    if not normalize:
        return torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    return torch.linalg.vector_norm(x.float(), dim=1).clamp_min_(EPS).reciprocal_()


def input_grad(d_hat: torch.Tensor, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """dx (float32) from dx̂ (float32): the normalization's backward as an N×D epilogue. x̂ is
    formed by division, as the other backends do, so that a 1-wide row's zero gradient stays zero."""
    if not normalize:
        return d_hat
    x_hat, norms = normalize_forward(x.float(), True)
    return normalize_backward(d_hat, x_hat, norms)


@triton.jit
def similarity_tile(A, B, offs_a, offs_b, mask_a, mask_b, d, stride_a, stride_ad, stride_b, stride_bd,
                    inv_a, inv_b, scale, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    """z[a, b] = scale · ⟨A_a, B_b⟩ · inv_a[a] · inv_b[b] for one (BLOCK_A × BLOCK_B) tile, float32,
    looping over D in BLOCK_D chunks (any D: the last chunk is masked)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        a = tl.load(A + offs_a[:, None] * stride_a + offs_d[None, :] * stride_ad,
                    mask=mask_a[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(B + offs_b[:, None] * stride_b + offs_d[None, :] * stride_bd,
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    # inv_a·inv_b first: a commutative product, so that the tile read by rows (q, k) and by
    # columns (k, q) rounds alike and softmax − target is exactly 0 where it should be.
    return acc * (inv_a[:, None] * inv_b[None, :]) * scale
