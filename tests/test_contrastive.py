"""contrastive_loss on every fast backend against the float64 reference (DESIGN §4)."""

import pytest
import torch

import mmkd_kernels as mk
from conftest import FAST_BACKENDS, TOLERANCE, grads_of, leaf, randn, rel_err, runs

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, M, D): single rows, M > N, widths 1 .. 384, and N = 1000.
SHAPES = [(1, 1, 7), (2, 3, 1), (3, 3, 64), (17, 29, 7), (17, 17, 384), (130, 131, 100), (300, 300, 64),
          (1000, 1000, 64), (257, 1000, 384)]
LAYOUTS = ["contiguous", "transposed", "strided"]


def _check(backend, q, k, *, grad_output=None, **kwargs):
    """Loss and gradients of ``backend`` against the float64 reference on the same rounded inputs."""
    tol = TOLERANCE[q.dtype]
    inputs = [x for x in (q, k) if x.requires_grad]
    out = mk.contrastive_loss(q, k, backend=backend, **kwargs)
    q64 = leaf(q.double()) if q.requires_grad else q.double()
    k64 = leaf(k.double()) if k.requires_grad else k.double()
    ref = mk.contrastive_loss(q64, k64, backend="reference", **kwargs)
    assert out.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert rel_err(out, ref) <= tol, f"loss: {rel_err(out, ref):.2e} > {tol:.0e}"
    g = grads_of(out, inputs, grad_output)
    g_ref = grads_of(ref, [x for x in (q64, k64) if x.requires_grad],
                     None if grad_output is None else grad_output.double())
    for name, a, b in zip(("dq", "dk"), g, g_ref):
        assert a.dtype == q.dtype and a.shape == b.shape
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e} > {tol:.0e}"
    return out


@pytest.mark.parametrize("backend,dtype,n,m,d", [
    (b, dtype, *shape) for b in FAST_BACKENDS for dtype in DTYPES for shape in SHAPES if runs(b, dtype, shape[0] * shape[1] * shape[2])
], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(backend, dtype, n, m, d, seed):
    q = leaf(randn(n, d, seed=seed, dtype=dtype))
    k = leaf(randn(m, d, seed=seed + 100, dtype=dtype))
    _check(backend, q, k, temperature=0.05)


@pytest.mark.parametrize("backend,dtype", [
    (b, dtype) for b in FAST_BACKENDS for dtype in (torch.float32, torch.float64, torch.float16) if runs(b, dtype, 0)
], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", [2, 3])
def test_options(backend, layout, dtype, seed):
    """symmetric, given targets, normalize=False, every reduction, non-unit grad_output, views."""
    n, m, d = 37, 53, 24
    gen = torch.Generator().manual_seed(seed)
    q = leaf(randn(n, d, seed=seed, dtype=dtype, layout=layout))
    k = leaf(randn(m, d, seed=seed + 100, dtype=dtype, layout=layout))
    targets = torch.randint(0, m, (n,), generator=gen)
    weights = torch.rand(n, generator=gen, dtype=torch.float64).to(torch.float32 if dtype != torch.float64 else dtype) + 0.5
    temperature = 0.1 if dtype != torch.float16 else 0.5  # fp16 inputs: keep |z| where fp16 holds it
    for reduction in ("mean", "sum"):
        _check(backend, q, k, targets=targets, reduction=reduction, temperature=temperature)
    _check(backend, q, k, targets=targets, reduction="none", grad_output=weights, temperature=temperature)
    _check(backend, q * 0.2, k * 0.3, normalize=False, temperature=1.0)
    kq = leaf(randn(n, d, seed=seed + 200, dtype=dtype, layout=layout))
    _check(backend, q, kq, symmetric=True, temperature=0.05)
    _check(backend, q, kq, symmetric=True, reduction="none", grad_output=weights, temperature=0.05)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradient_reaches_only_inputs_that_require_it(backend):
    q = leaf(randn(19, 16, seed=4))
    k = randn(23, 16, seed=5)  # a frozen teacher
    _check(backend, q, k)
    loss = mk.contrastive_loss(q, k, backend=backend)
    loss.backward()
    assert q.grad is not None and k.grad is None
    _check(backend, q.detach(), leaf(k))


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_nan_and_inf_inputs_give_nan(backend):
    q, k = randn(9, 8, seed=6), randn(9, 8, seed=7)
    q[3, 2] = float("nan")
    assert torch.isnan(mk.contrastive_loss(q, k, backend=backend))
    assert torch.isnan(mk.contrastive_loss(q, k, backend=backend, normalize=False))
    q[3, 2] = float("inf")
    assert torch.isnan(mk.contrastive_loss(q, k, backend=backend))
    assert not torch.isfinite(mk.contrastive_loss(q, k, backend=backend, normalize=False))


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if runs(b, torch.float64, 0)])
def test_gradcheck_float64(backend):
    q = leaf(randn(5, 4, seed=8, dtype=torch.float64))
    k = leaf(randn(7, 4, seed=9, dtype=torch.float64))
    targets = torch.tensor([6, 0, 3, 3, 1])
    assert torch.autograd.gradcheck(
        lambda a, b: mk.contrastive_loss(a, b, targets=targets, temperature=0.3, reduction="none", backend=backend),
        (q, k),
    )
    # A mean computes its gradients inside the forward (ops.contrastive_forward_with_grad).
    assert torch.autograd.gradcheck(
        lambda a, b: mk.contrastive_loss(a, b, targets=targets, temperature=0.3, backend=backend), (q, k)
    )
    kq = leaf(randn(5, 4, seed=10, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, b: mk.contrastive_loss(a, b, symmetric=True, temperature=0.3, reduction="none", backend=backend),
        (q, kq),
    )


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_no_grad_forward_equals_the_forward_with_gradients(backend):
    """Under no_grad the loss takes the plain forward; with gradients wanted, the fused one."""
    q, k = leaf(randn(45, 12, seed=11)), randn(60, 12, seed=12)
    with torch.no_grad():
        plain = mk.contrastive_loss(q, k, backend=backend)
    fused = mk.contrastive_loss(q, k, backend=backend)
    assert fused.requires_grad and not plain.requires_grad
    assert rel_err(plain, fused) <= 1e-6
