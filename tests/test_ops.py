"""The custom-op layer: torch.library.opcheck on every op, torch.compile(fullgraph=True) through both losses."""

import pytest
import torch

import mmkd_kernels as mk
from mmkd_kernels import backends, ops
from mmkd_test_support import TARGETS, TOLERANCE, Target, leaf, randn, rel_err


def _sample_args(backend, device):
    """(op, args) pairs covering every op of a backend, gradients required where they flow."""
    ops = getattr(torch.ops, backends.NAMESPACES[backend])
    q, k = leaf(randn(7, 5, seed=0, device=device)), leaf(randn(9, 5, seed=1, device=device))
    kq = leaf(randn(7, 5, seed=2, device=device))
    targets = torch.tensor([8, 0, 3, 3, 1, 2, 6], device=device)
    arange = torch.arange(7, device=device)
    s, t = leaf(randn(11, 6, seed=3, device=device)), leaf(randn(11, 4, seed=4, device=device))
    row_loss, col_loss, row_lse, col_lse = ops.contrastive_forward(q, kq, arange, 10.0, True, True)
    g = torch.rand(7, device=device)
    samples = [
        (ops.contrastive_forward, (q, k, targets, 20.0, True, False)),
        (ops.contrastive_forward, (q, kq, arange, 10.0, True, True)),
        (ops.contrastive_forward, (q.double(), k.double(), targets, 2.0, False, False)),
        (ops.contrastive_forward_with_grad, (q, k, targets, 20.0, True, True, True)),
        (ops.contrastive_forward_with_grad, (q, k.detach(), targets, 20.0, False, True, False)),
        (ops.contrastive_backward, (g, g, q.detach(), kq.detach(), arange, row_lse.detach(),
                                    col_lse.detach(), row_loss.detach(), col_loss.detach(), 10.0, True, True,
                                    True, False)),
    ]
    for kind in ("mse", "pearson", "kl"):
        samples.append((ops.structure_tile_forward, (s.detach(), t.detach(), kind, 2.0, True, 0, 11)))
        samples.append((ops.structure_tile_forward, (s.detach(), t.detach(), kind, 2.0, True, 3, 5)))
        samples.append((ops.structure_tile_forward_with_grad, (s, t.detach(), kind, 2.0, True, 2, 7, True, False)))
    for kind in ("mse", "pearson"):
        samples.append((ops.structure_gram_forward, (s.detach(), t.detach(), kind, True)))
        samples.append((ops.structure_gram_forward_with_grad, (s, t, kind, False, True, True)))
    if backend == "triton" or device == "cuda":  # float64 is refused there (test_errors.py)
        samples = [(op, args) for op, args in samples
                   if not any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)]
    return samples


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_opcheck_every_op(target):
    namespace = backends.NAMESPACES[target.backend]
    checked = set()
    for op, args in _sample_args(target.backend, target.device):
        torch.library.opcheck(op, args)
        checked.add(op._qualified_op_name)
    assert checked == {f"{namespace}::{name}" for name in ops.SCHEMAS}, checked


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_torch_compile_fullgraph(target):
    """Both losses in one compiled function: no graph break, same value and gradient as eager."""

    def objective(student, teacher, sentence_student, sentence_teacher):
        backend = target.backend
        token = mk.contrastive_loss(student, teacher, temperature=0.05, backend=backend)
        structure = mk.structure_loss(student, teacher, kind="pearson", algorithm="tile", backend=backend)
        gram = mk.structure_loss(sentence_student, sentence_teacher, kind="mse", algorithm="gram", backend=backend)
        kl = mk.structure_loss(sentence_student, sentence_teacher, kind="kl", temperature=0.1, backend=backend)
        return token + structure + gram + kl

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    device = target.device
    student, teacher = leaf(randn(33, 16, seed=5, device=device)), randn(33, 16, seed=6, device=device)
    s2, t2 = leaf(randn(12, 8, seed=7, device=device)), randn(12, 4, seed=8, device=device)
    eager = objective(student, teacher, s2, t2)
    eager_grads = torch.autograd.grad(eager, (student, s2))
    out = compiled(student, teacher, s2, t2)
    grads = torch.autograd.grad(out, (student, s2))
    assert rel_err(out, eager) <= 1e-6
    for a, b in zip(grads, eager_grads):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_torch_compile_dynamic_shapes(target):
    """dynamic=True (one graph for every N, as a trainer's varying token counts want): the argument
    checks trace (math.isfinite on the temperature did not), and each N matches eager."""

    def objective(student, teacher):
        backend = target.backend
        return (mk.contrastive_loss(student, teacher, temperature=0.05, backend=backend)
                + mk.contrastive_loss(student, teacher, symmetric=True, reduction="none", backend=backend).mean()
                + mk.structure_loss(student, teacher, kind="pearson", algorithm="tile", backend=backend)
                + mk.structure_loss(student, teacher, kind="kl", temperature=0.1, backend=backend))

    torch._dynamo.reset()  # the other targets' graphs of this code object count towards its recompile limit
    compiled = torch.compile(objective, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (7, 11, 30):
        student = leaf(randn(n, 16, seed=n, device=target.device))
        teacher = randn(n, 16, seed=n + 1, device=target.device)
        eager = objective(student, teacher)
        (eager_grad,) = torch.autograd.grad(eager, student)
        out = compiled(student, teacher)
        (grad,) = torch.autograd.grad(out, student)
        assert rel_err(out, eager) <= 1e-6 and rel_err(grad, eager_grad) <= 1e-6


def test_torch_compile_inductor_cpu():
    """The default inductor backend on CPU builds and runs the same graph (the user's usual call)."""
    f = torch.compile(lambda a, b: mk.contrastive_loss(a, b, backend="chunked"), fullgraph=True)
    q, k = leaf(randn(21, 8, seed=9)), randn(21, 8, seed=10)
    out = f(q, k)
    out.backward()
    q64 = leaf(q.detach().double())
    ref = mk.contrastive_loss(q64, k.double(), backend="reference")
    ref.backward()
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]
    assert rel_err(q.grad, q64.grad) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_a_second_derivative_is_refused_not_zero(target):
    """The fused ops carry gradients computed in the forward: create_graph=True raises, where a
    scaled constant would have given a second derivative of zero (also beside a term that has one)."""
    q, k = leaf(randn(9, 6, seed=11, device=target.device)), randn(9, 6, seed=12, device=target.device)
    losses = {
        "contrastive": lambda: mk.contrastive_loss(q, k, backend=target.backend),
        "structure kl": lambda: mk.structure_loss(q, k, kind="kl", backend=target.backend),
        "structure pearson (gram)": lambda: mk.structure_loss(q, k, algorithm="gram", backend=target.backend),
        # the per-row path: its backward op recomputes the tiles (it raised an unclear error before)
        "contrastive, reduction none": lambda: mk.contrastive_loss(q, k, reduction="none",
                                                                   backend=target.backend).sum(),
        "contrastive, symmetric": lambda: mk.contrastive_loss(q, k, symmetric=True, backend=target.backend),
    }
    for name, loss in losses.items():
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(loss() + q.pow(3).sum(), q, create_graph=True)
        (plain,) = torch.autograd.grad(loss(), q)  # without create_graph, as before
        assert torch.isfinite(plain).all() and plain.abs().sum() > 0, name


@pytest.mark.parametrize("target", TARGETS + [Target("reference", "cpu")], ids=str)
def test_autocast_leaves_the_losses_in_their_own_precision(target):
    """Under a model's bfloat16 autocast, float32 rows still give float32 losses and gradients at
    float32's tolerance (the ops run with autocast off; before, chunked's matmuls ran in bfloat16).
    The backward runs outside the autocast region, as PyTorch's AMP recipe has it."""
    device = target.device
    q, k = leaf(randn(40, 24, seed=13, device=device)), randn(40, 24, seed=14, device=device)
    calls = {
        "contrastive": lambda a, b, backend: mk.contrastive_loss(a, b, backend=backend),
        "symmetric": lambda a, b, backend: mk.contrastive_loss(a, b, symmetric=True, reduction="none", backend=backend).mean(),
        "mse (tile)": lambda a, b, backend: mk.structure_loss(a, b, kind="mse", algorithm="tile", backend=backend),
        "pearson (gram)": lambda a, b, backend: mk.structure_loss(a, b, algorithm="gram", backend=backend),
        "kl": lambda a, b, backend: mk.structure_loss(a, b, kind="kl", temperature=0.2, backend=backend),
    }
    for name, call in calls.items():
        q64 = leaf(q.detach().double().cpu())
        want = call(q64, k.double().cpu(), "reference")
        (want_grad,) = torch.autograd.grad(want, q64)
        with torch.autocast(device, dtype=torch.bfloat16):
            got = call(q, k, target.backend)
        (grad,) = torch.autograd.grad(got, q)
        assert got.dtype == torch.float32 and grad.dtype == torch.float32, name
        assert rel_err(got, want) <= TOLERANCE[torch.float32], (name, rel_err(got, want))
        assert rel_err(grad, want_grad) <= TOLERANCE[torch.float32], (name, rel_err(grad, want_grad))


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_tile_ops_refuse_rows_outside_the_inputs(target):
    """Called directly, a tile op given rows past N or a teacher of another N raises (triton's
    kernels read past the inputs and returned inf; chunked failed with a bare IndexError)."""
    ops_ = getattr(torch.ops, backends.NAMESPACES[target.backend])
    s, t = randn(10, 4, seed=15, device=target.device), randn(10, 5, seed=16, device=target.device)
    for start, count, teacher in ((8, 5, t), (-2, 3, t), (10, 1, t), (0, 10, t[:9])):
        with pytest.raises((ValueError, RuntimeError), match="rows|size|dimension"):
            ops_.structure_tile_forward(s, teacher, "mse", 1.0, True, start, count)
        with pytest.raises((ValueError, RuntimeError), match="rows|size|dimension"):
            ops_.structure_tile_forward_with_grad(s, teacher, "kl", 1.0, True, start, count, True, False)
    assert ops_.structure_tile_forward(s, t, "mse", 1.0, True, 10, 0).shape == (0,)
