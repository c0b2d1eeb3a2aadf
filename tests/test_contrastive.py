"""contrastive_loss on every fast backend against the float64 reference (DESIGN §4)."""

import pytest
import torch

import mmkd_kernels as mk
from mmkd_test_support import (TARGETS, TOLERANCE, ZERO_TRUTH, Target, far_apart, grads_of, leaf, randn, rel_err,
                               runs)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, M, D): single rows, M > N, widths 1 .. 768, and N = 1000.
SHAPES = [(1, 1, 7), (1, 5, 7), (2, 3, 1), (3, 3, 64), (17, 29, 7), (17, 17, 384), (19, 23, 768), (130, 131, 100),
          (300, 300, 64), (1000, 1000, 64), (257, 1000, 384)]
# Truths that are exactly zero: one column (loss 0, gradients 0), one normalized width (gradients 0).
ZERO_TRUTH_SHAPES = {(1, 1, 7), (2, 3, 1)}
LAYOUTS = ["contiguous", "transposed", "strided"]


def _cpu64(x):
    """The float64 CPU copy the reference gets (a leaf when x records gradients)."""
    y = x.detach().double().cpu()
    return leaf(y) if x.requires_grad else y


def _check(target: Target, q, k, *, grad_output=None, floor=1e-30, **kwargs):
    """Loss and gradients of a target against the float64 reference on the same rounded inputs
    (``floor``: mmkd_test_support.ZERO_TRUTH where the truth is zero)."""
    tol = max(TOLERANCE[q.dtype], TOLERANCE[k.dtype])
    inputs = [x for x in (q, k) if x.requires_grad]
    out = mk.contrastive_loss(q, k, backend=target.backend, **kwargs)
    q64, k64 = _cpu64(q), _cpu64(k)
    ref_kwargs = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    ref = mk.contrastive_loss(q64, k64, backend="reference", **ref_kwargs)
    assert out.dtype == (torch.float64 if torch.promote_types(q.dtype, k.dtype) == torch.float64 else torch.float32)
    assert rel_err(out, ref, floor) <= tol, f"loss: {rel_err(out, ref, floor):.2e} > {tol:.0e}"
    g = grads_of(out, inputs, grad_output)
    g_ref = grads_of(ref, [x for x in (q64, k64) if x.requires_grad],
                     None if grad_output is None else grad_output.double().cpu())
    for name, x, a, b in zip(("dq", "dk"), inputs, g, g_ref):
        assert a.dtype == x.dtype and a.shape == b.shape
        assert rel_err(a, b, floor) <= tol, f"{name}: {rel_err(a, b, floor):.2e} > {tol:.0e}"
    return out


@pytest.mark.parametrize("target,dtype,n,m,d", [
    (t, dtype, *shape) for t in TARGETS for dtype in DTYPES for shape in SHAPES if runs(t, dtype, shape[0] * shape[1] * shape[2])
], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(target, dtype, n, m, d, seed):
    q = leaf(randn(n, d, seed=seed, dtype=dtype, device=target.device))
    k = leaf(randn(m, d, seed=seed + 100, dtype=dtype, device=target.device))
    _check(target, q, k, temperature=0.05, floor=ZERO_TRUTH if (n, m, d) in ZERO_TRUTH_SHAPES else 1e-30)


@pytest.mark.parametrize("target,dtype", [
    (t, dtype) for t in TARGETS for dtype in DTYPES if runs(t, dtype, 0)
], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", [2, 3])
def test_options(target, layout, dtype, seed):
    """symmetric, given targets, normalize=False, every reduction, non-unit grad_output, views."""
    n, m, d = 37, 53, 24
    gen = torch.Generator().manual_seed(seed)
    device = target.device
    q = leaf(randn(n, d, seed=seed, dtype=dtype, layout=layout, device=device))
    k = leaf(randn(m, d, seed=seed + 100, dtype=dtype, layout=layout, device=device))
    targets = torch.randint(0, m, (n,), generator=gen).to(device)
    if layout != "contiguous":  # a column of (row, teacher row) pairs: Triton read it as if contiguous
        targets = torch.stack([torch.arange(n, device=device), targets], dim=1)[:, 1]
    weights = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(
        device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    temperature = 0.1 if dtype != torch.float16 else 0.5  # fp16 inputs: keep |z| where fp16 holds it
    for reduction in ("mean", "sum"):
        _check(target, q, k, targets=targets, reduction=reduction, temperature=temperature)
    _check(target, q, k, targets=targets, reduction="none", grad_output=weights, temperature=temperature)
    _check(target, q, k.detach(), targets=targets, temperature=temperature)  # the frozen teacher, the main case
    _check(target, q * 0.2, k * 0.3, normalize=False, temperature=1.0)
    if layout != "contiguous":  # one teacher row for all (stride 0): the interpreter segfaulted
        _check(target, q, k, targets=targets[:1].expand(n), temperature=temperature)
    kq = leaf(randn(n, d, seed=seed + 200, dtype=dtype, layout=layout, device=device))
    _check(target, q, kq, symmetric=True, temperature=0.05)
    _check(target, q, kq, symmetric=True, reduction="none", grad_output=weights, temperature=0.05)


@pytest.mark.parametrize("target,dtype", [
    (t, dtype) for t in TARGETS for dtype in (torch.float32, torch.float16, torch.bfloat16) if runs(t, dtype, 0)
], ids=str)
@pytest.mark.parametrize("temperature", [0.02, 0.005])
def test_low_temperature(target, dtype, temperature):
    """|scale| past the fixed shift's bound (40): the kernels keep a running max instead, forward and
    backward, both directions, at the sharp softmaxes of a low temperature."""
    q = leaf(randn(37, 24, seed=12, dtype=dtype, device=target.device))
    k = leaf(randn(53, 24, seed=13, dtype=dtype, device=target.device))
    _check(target, q, k, temperature=temperature)
    _check(target, q, leaf(k[:37]), temperature=temperature, symmetric=True)
    _check(target, q, k, temperature=temperature, reduction="none",
           grad_output=torch.linspace(0.5, 1.5, 37, device=target.device))


MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
         (torch.float32, torch.float64)]


@pytest.mark.parametrize("target,dtypes", [
    (t, dtypes) for t in TARGETS for dtypes in MIXED if runs(t, torch.promote_types(*dtypes), 0)
], ids=str)
def test_student_and_teacher_of_different_dtypes(target, dtypes):
    """Computed in the promoted dtype, as torch would; each gradient in its input's dtype, the loss
    float32 (float64 when either is): e.g. a bfloat16 student against a float32 teacher's cache."""
    n, m, d = 37, 53, 24
    q = leaf(randn(n, d, seed=8, dtype=dtypes[0], device=target.device))
    k = leaf(randn(m, d, seed=9, dtype=dtypes[1], device=target.device))
    temperature = 0.5 if torch.float16 in dtypes else 0.1
    _check(target, q, k, temperature=temperature)
    _check(target, q, k.detach(), temperature=temperature)
    _check(target, q, leaf(k[:n]), symmetric=True, temperature=temperature)
    _check(target, q, k, reduction="none", temperature=temperature,
           grad_output=torch.linspace(0.5, 1.5, n, device=target.device))


@pytest.mark.parametrize("target", [t for t in TARGETS if runs(t, torch.float16, 0)], ids=str)
def test_rows_past_int32_offsets(target, cuda_memory_released):
    """Rows 2^25 elements apart, so the last one starts 2^31 elements past the first: Triton's int32
    address math wrapped there and read outside the tensor (the interpreter crashed), until the
    kernels took int64 indices for such tensors. Every kernel: forward with both gradients, and the
    symmetric loss's forward and recomputing backward."""
    q, k = map(leaf, far_apart(65, (40, 40), seed=0, device=target.device))
    _check(target, q, k, temperature=0.1)
    _check(target, q, k, symmetric=True, temperature=0.1)


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_gradient_reaches_only_inputs_that_require_it(target):
    q = leaf(randn(19, 16, seed=4, device=target.device))
    k = randn(23, 16, seed=5, device=target.device)  # a frozen teacher
    _check(target, q, k)
    loss = mk.contrastive_loss(q, k, backend=target.backend)
    loss.backward()
    assert q.grad is not None and k.grad is None
    _check(target, q.detach(), leaf(k))


@pytest.mark.parametrize("target", TARGETS + [Target("reference", "cpu")], ids=str)
def test_nan_and_inf_inputs_give_nan(target):
    backend = target.backend
    q, k = randn(9, 8, seed=6, device=target.device), randn(9, 8, seed=7, device=target.device)
    q[3, 2] = float("nan")
    assert torch.isnan(mk.contrastive_loss(q, k, backend=backend))
    assert torch.isnan(mk.contrastive_loss(q, k, backend=backend, normalize=False))
    q[3, 2] = float("inf")
    assert torch.isnan(mk.contrastive_loss(q, k, backend=backend))
    assert not torch.isfinite(mk.contrastive_loss(q, k, backend=backend, normalize=False))


@pytest.mark.parametrize("backend", [t.backend for t in TARGETS if t.device == "cpu" and runs(t, torch.float64, 0)])
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


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_no_grad_forward_equals_the_forward_with_gradients(target):
    """Under no_grad the loss takes the plain forward; with gradients wanted, the fused one."""
    q, k = leaf(randn(45, 12, seed=11, device=target.device)), randn(60, 12, seed=12, device=target.device)
    with torch.no_grad():
        plain = mk.contrastive_loss(q, k, backend=target.backend)
    fused = mk.contrastive_loss(q, k, backend=target.backend)
    assert fused.requires_grad and not plain.requires_grad
    assert rel_err(plain, fused) <= 1e-6


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("noise", [0.3, 0.03])
def test_nearly_aligned_pairs_keep_their_digits(target, noise):
    """Late in distillation the student's rows are close to their teacher's: ℓ ≈ 1e-5 and p_t rounds
    to 1 in float32. lse − z_t and p_t − 1 would lose most digits; log1p and the sums without the
    target keep them (all reductions, both directions, the fused and the recompute backward)."""
    gen = torch.Generator().manual_seed(17)
    k64 = torch.randn(96, 48, generator=gen, dtype=torch.float64)
    q64 = k64 + noise * torch.randn(96, 48, generator=gen, dtype=torch.float64)
    q, k = leaf(q64.float().to(target.device)), leaf(k64.float().to(target.device))
    weights = torch.rand(96, generator=gen).to(target.device) + 0.5
    out = _check(target, q, k, temperature=0.05)
    assert out.item() < 1e-4  # the regime this test is about
    _check(target, q, k, temperature=0.05, symmetric=True)
    _check(target, q, k, temperature=0.05, reduction="none", grad_output=weights)


@pytest.mark.parametrize("target,dtype", [(t, dtype) for t in TARGETS for dtype in (torch.float16, torch.bfloat16)
                                          if runs(t, dtype, 0)], ids=str)
def test_nearly_aligned_pairs_in_half_precision(target, dtype):
    """The same regime with half-precision inputs: the softmax's weights off the target are about
    e^{−20} = 2e-9, below float16's range (the Triton gradient lost them and was 0.75 off at the
    accuracy table's aligned pairs). The loss is scaled as a GradScaler that has grown scales it,
    so that the half-precision gradient itself is not in float16's subnormals."""
    gen = torch.Generator().manual_seed(19)
    k64 = torch.randn(96, 48, generator=gen, dtype=torch.float64)
    q64 = k64 + 0.03 * torch.randn(96, 48, generator=gen, dtype=torch.float64)
    q, k = leaf(q64.to(target.device, dtype)), leaf(k64.to(target.device, dtype))
    out = _check(target, q, k, temperature=0.05, grad_output=torch.tensor(2.0**20, device=target.device))
    assert out.item() < 1e-4  # the regime this test is about


@pytest.mark.parametrize("target,dtype,n", [
    (t, dtype, n) for t in TARGETS for dtype in (torch.float32, torch.float16, torch.bfloat16) for n in (37, 1100)
    if runs(t, dtype, n * n * 24)
], ids=str)
@pytest.mark.parametrize("noise", [1.0, 0.03])
def test_symmetric_as_users_run_it(monkeypatch, target, dtype, n, noise):
    """The conftest's NaN poisoning needs torch.use_deterministic_algorithms, which also sends the
    symmetric loss of the Triton and CUDA kernels to their two-pass, reproducible path. Users run
    the other: column statistics from the rows' own pass, summed by atomics. Here that path, with
    poisoning kept on the CPU (only the kernels' question is answered False) and, on a GPU, freed
    NaN blocks for the caching allocator to hand out again."""
    if target.device == "cuda":
        torch.use_deterministic_algorithms(False)  # the CUDA kernels read the flag in C++
        torch.full((1 << 26,), float("nan"), device="cuda")  # freed at once, its block kept by the allocator
    else:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    gen = torch.Generator().manual_seed(29)
    k64 = torch.randn(n, 24, generator=gen, dtype=torch.float64)
    q64 = k64 + noise * torch.randn(n, 24, generator=gen, dtype=torch.float64)
    q, k = leaf(q64.to(target.device, dtype)), leaf(k64.to(target.device, dtype))
    # Half-precision gradients of aligned pairs scaled as a GradScaler grows its scale, out of
    # float16's subnormals (test_nearly_aligned_pairs_in_half_precision says why).
    scale = 2.0**20 if dtype != torch.float32 and noise < 0.1 else 1.0
    _check(target, q, k, temperature=0.05, symmetric=True, grad_output=torch.tensor(scale, device=target.device))
    _check(target, q, k, temperature=0.05, symmetric=True, reduction="none",
           grad_output=torch.linspace(0.5, 1.5, n, device=target.device) * (scale / n))


@pytest.mark.parametrize("target", [t for t in TARGETS if runs(t, torch.float32, 1100 * 1100 * 16)], ids=str)
@pytest.mark.parametrize("noise", [1.0, 0.03])
def test_symmetric_across_row_blocks(target, noise):
    """N = 1100: past the native CPU kernel's 1024-row block, so the columns' running statistics
    of the symmetric loss are merged across blocks (rescaled to a new max, the diagonal left out),
    for random and for nearly aligned pairs."""
    gen = torch.Generator().manual_seed(23)
    k64 = torch.randn(1100, 16, generator=gen, dtype=torch.float64)
    q64 = k64 + noise * torch.randn(1100, 16, generator=gen, dtype=torch.float64)
    q, k = leaf(q64.float().to(target.device)), leaf(k64.float().to(target.device))
    _check(target, q, k, temperature=0.05, symmetric=True)


# chunked on a GPU asserts in the stream: a device-side assert that would end the process's CUDA use.
@pytest.mark.parametrize("target", [t for t in TARGETS if not (t.backend == "chunked" and t.device == "cuda")], ids=str)
@pytest.mark.parametrize("bad", [-1, 29], ids=["minus-one", "past-the-end"])
def test_a_direct_op_call_with_a_target_outside_the_teacher_rows_fails_or_gives_nan(target, bad):
    """The public losses check targets; the ops called directly must not turn one outside [0, M) into
    a finite loss (chunked wrapped −1 to the last column) or into a read outside the teacher (the Triton
    and CUDA kernels read its row): they raise (chunked, native on the CPU) or give that row NaN."""
    from mmkd_kernels import backends

    ops = getattr(torch.ops, backends.NAMESPACES[target.backend])
    q, k = randn(17, 24, seed=31, device=target.device), randn(29, 24, seed=32, device=target.device)
    good = torch.arange(17, device=target.device)
    targets = good.clone()
    targets[5] = bad
    calls = {
        "forward": lambda t: ops.contrastive_forward(q, k, t, 10.0, True, False)[0],
        "forward with grad": lambda t: ops.contrastive_forward_with_grad(q, k, t, 10.0, True, True, False)[1],
        "forward with grad, running max": lambda t: ops.contrastive_forward_with_grad(q, k, t, 100.0, True, True,
                                                                                       False)[1],
    }
    others = torch.arange(17, device=target.device) != 5
    for name, call in calls.items():
        try:
            out = call(targets)
        except RuntimeError as error:
            assert target.backend in ("chunked", "native") and target.device == "cpu", name
            assert "targets must lie in [0, 29)" in str(error), name
            continue
        want = call(good)
        assert out[5].isnan().all(), name
        assert torch.equal(out[others], want[others]), name


@pytest.mark.parametrize("target,dtype", [
    (t, dtype) for t in TARGETS if t.backend == "triton"
    for dtype in (torch.float32, torch.float16, torch.bfloat16) if runs(t, dtype, 0)
], ids=str)
@pytest.mark.parametrize("splits", ["2", "3", "7"])
def test_columns_split_across_programs(monkeypatch, target, dtype, splits):
    """Triton splits the streamed columns where few row blocks would leave a GPU idle (a rank's local
    rows against every rank's teacher rows), and merges the splits' statistics and gradients.
    Forced here (MMKD_TRITON_COLUMN_SPLITS), with splits that cut tiles in two (100 of 300
    columns against 64-wide tiles) and targets on both sides of a cut: every kernel, under the
    fixed shift and under a running max, both directions, the symmetric loss's one pass and its
    two, and a target outside the teacher in a direct op call (NaN, as with one split)."""
    monkeypatch.setenv("MMKD_TRITON_COLUMN_SPLITS", splits)
    n, m, d = 37, 300, 24
    device = target.device
    q = leaf(randn(n, d, seed=41, dtype=dtype, device=device))
    k = leaf(randn(m, d, seed=42, dtype=dtype, device=device))
    targets = torch.tensor([0, 63, 64, 99, 100, 101, 127, 128, 199, 200, 299] * 4)[:n].to(device)
    temperature = 0.1 if dtype != torch.float16 else 0.5
    _check(target, q, k.detach(), targets=targets, temperature=temperature)  # the frozen teacher: one fused pass
    _check(target, q, k, targets=targets, temperature=temperature)
    _check(target, q, k, targets=targets, temperature=0.005 if dtype != torch.float16 else 0.02)  # a running max
    _check(target, q, k, targets=targets, reduction="none", temperature=temperature,
           grad_output=torch.linspace(0.5, 1.5, n, device=device))
    kq = leaf(randn(n, d, seed=43, dtype=dtype, device=device))
    _check(target, q, kq, symmetric=True, temperature=0.05)
    if target.device == "cpu":  # the one-pass symmetric loss, as users run it (test_symmetric_as_users_run_it)
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
        _check(target, q, kq, symmetric=True, temperature=0.05)
    ops = torch.ops.mmkd_triton
    bad = targets.clone()
    bad[5] = m
    for scale in (10.0, 100.0):
        loss = ops.contrastive_forward(q.detach(), k.detach(), bad, scale, True, False)[0]
        dq = ops.contrastive_forward_with_grad(q.detach(), k.detach(), bad, scale, True, True, False)[1]
        assert loss[5].isnan() and loss[torch.arange(n, device=device) != 5].isfinite().all()
        assert dq[5].isnan().all() and dq[torch.arange(n, device=device) != 5].isfinite().all()


@pytest.mark.parametrize("target", [t for t in TARGETS if runs(t, torch.float32, 16384 * 16384 * 32)], ids=str)
def test_symmetric_column_statistics_over_many_rows(target):
    """A column's statistics of the symmetric loss sum over all N rows. Native's CPU kernel added
    them one by one in float32, so the small terms fell below the running sum's last digit: its
    column losses were 1.7e-5 off at N = 16384 (the loss and gradients 1.8e-5 at N = 32768), past
    float32's 1e-5. The op's column statistics against chunked's in float64 (the reference would
    hold N² logits)."""
    from mmkd_kernels import backends

    n, d = 16384, 32
    gen = torch.Generator().manual_seed(37)
    k64 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    q64 = k64 + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    q, k = q64.float().to(target.device), k64.float().to(target.device)
    own = torch.arange(n, device=target.device)
    ops = getattr(torch.ops, backends.NAMESPACES[target.backend])
    out = ops.contrastive_forward(q, k, own, 20.0, True, True)
    ref = torch.ops.mmkd_chunked.contrastive_forward(q.double().cpu(), k.double().cpu(), own.cpu(), 20.0, True, True)
    for name, a, b in zip(("row loss", "column loss", "row lse", "column lse"), out, ref):
        assert rel_err(a, b) <= TOLERANCE[torch.float32], f"{name}: {rel_err(a, b):.2e}"
