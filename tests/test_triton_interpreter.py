"""The repairs of Triton's interpreter (benchmarks/triton_interpreter_repairs.py): bfloat16 checked
against torch on the CPU, and scalar arguments' ``__index__`` under any numpy. Only where the interpreter runs (no GPU): on a GPU the kernels
are compiled and the interpreter is not used."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from benchmarks import triton_interpreter_repairs as repair
from mmkd_test_support import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="a GPU is present: Triton compiles, the interpreter is unused")


@triton.jit
def _dot_kernel(A, B, OUT, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(OUT + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(X, OUT, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(OUT + r, tl.load(X + r).to(tl.bfloat16))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.full((a.shape[0], b.shape[1]), float("nan"))
    _dot_kernel[(1,)](a, b, out, M=a.shape[0], K=a.shape[1], N=b.shape[1])
    return out


def _bfloat16_pair(seed: int):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 32, generator=generator).to(torch.bfloat16)
    b = torch.randn(32, 16, generator=generator).to(torch.bfloat16)
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_dot_is_the_float32_product_of_its_values(seed):
    a, b = _bfloat16_pair(seed)
    want = a.float() @ b.float()  # bfloat16 products are exact in float32; only the order of sums differs
    assert torch.allclose(_dot(a, b), want, rtol=1e-6, atol=1e-5)


def test_the_interpreter_needs_the_repair(monkeypatch):
    """Without the repair the dot multiplies bit patterns (triton-lang/triton#11584). If this fails,
    the interpreter has been fixed and benchmarks/triton_interpreter_repairs.py can go."""
    assert repair.applies()
    builder = triton.runtime.interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "create_dot", builder.create_dot.__wrapped__)
    a, b = _bfloat16_pair(0)
    assert (_dot(a, b) - a.float() @ b.float()).abs().max() > 1e3


def test_float32_to_bfloat16_rounds_to_nearest_even():
    """Halfway cases both ways, just past halfway, and random values: torch's rounding, the GPU's."""
    one_ulp = 2.0**-7  # bfloat16's spacing in [1, 2)
    halfway = torch.tensor([1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2), 1 + one_ulp / 2 + 2.0**-20])
    x = torch.cat([halfway, torch.randn(60, generator=torch.Generator().manual_seed(3))])
    out = torch.empty(64, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, N=64)
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert out[0] == 1 and out[1] == 1 + 2 * one_ulp  # ties to the even neighbour, down then up


def test_the_conversions_round_trip():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view("uint16")
    widened = torch.from_numpy(repair.bits_to_float32(bits))
    assert torch.equal(widened, values.float())
    assert (repair.float32_to_bits(widened.numpy()) == bits).all()


@triton.jit
def _strided_sum_kernel(X, OUT, n, BLOCK: tl.constexpr):
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):  # a runtime bound: the interpreter takes n's __index__
        r = start + tl.arange(0, BLOCK)
        total += tl.load(X + r, mask=r < n, other=0.0)
    tl.store(OUT, tl.sum(total))


def test_scalar_arguments_index_under_any_numpy():
    """numpy 2.4 refuses int() of a one-element array of one dimension, which Triton 3.6's
    interpreter used for a scalar's __index__; the repair takes its element."""
    assert triton.runtime.interpreter._patch_lang_tensor._mmkd_index

    class Scalar:
        handle = triton.runtime.interpreter.TensorHandle(np.array([7], dtype=np.int32), tl.int32)

    assert repair.scalar_index(Scalar()) == 7
    x, out = torch.arange(37, dtype=torch.float32), torch.full((1,), float("nan"))
    _strided_sum_kernel[(1,)](x, out, 37, BLOCK=8)
    assert out.item() == x.sum().item()
