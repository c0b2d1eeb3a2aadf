"""Across ranks: 2 gloo processes on CPU give the loss and gradients of one process on the
concatenated batch (DESIGN §2 ``process_group``). Rank r returns L_r with mean_r L_r = L, and its
gradient is W·∂L/∂(its rows), so that DDP's averaging gives ∇L. The ranks hold different row counts,
as a word or token level does, and a rank may hold none (a batch without word links)."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmkd_kernels as mk
from mmkd_test_support import INTERPRETED, TOLERANCE, rel_err

WORLD = 2
D, DT = 8, 5
# (student rows, teacher rows) per rank
LAYOUTS = {"uneven": ((6, 4), (9, 7)), "empty-rank": ((0, 5), (0, 7))}


def _starts(counts):
    return [sum(counts[:r]) for r in range(WORLD)]

CONTRASTIVE_CASES = [
    {},
    {"targets": True, "temperature": 0.2},
    {"symmetric": True},
    {"reduction": "sum"},
    {"reduction": "none", "targets": True},
]
STRUCTURE_CASES = [("mse", "tile"), ("mse", "gram"), ("pearson", "tile"), ("pearson", "gram"), ("kl", "tile")]
# Every backend that runs on the CPU (gloo; triton under its interpreter), each across ranks
# against the float64 reference in one process on the same rounded inputs.
BACKENDS = [b for b in mk.available_backends() if b in ("reference", "chunked", "native")] + (
    ["triton"] if INTERPRETED else [])


def _dtype(backend: str) -> torch.dtype:
    """The ranks' input dtype: float64 (across ranks the sums only change order), float32 for triton."""
    return torch.float32 if backend == "triton" else torch.float64


def _rounded(x: torch.Tensor, backend: str) -> torch.Tensor:
    """x as the ranks of ``backend`` see it, in float64 for the reference."""
    return x.to(_dtype(backend)).double()


def _global_inputs(seed, n_local, m_local):
    """The global batch (float64): student, teacher (m_local per rank), local targets, structure pair."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(n_local), D, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(m_local), D, generator=gen, dtype=torch.float64)
    local_targets = [torch.randint(0, max(m, 1), (n,), generator=gen) for n, m in zip(n_local, m_local)]
    s = torch.randn(sum(n_local), D, generator=gen, dtype=torch.float64)
    t = torch.randn(sum(n_local), DT, generator=gen, dtype=torch.float64)
    weights = torch.rand(sum(n_local), generator=gen, dtype=torch.float64) + 0.5
    return q, k, local_targets, s, t, weights


def _contrastive(q, k, targets, case, backend, rank, process_group):
    kwargs = {key: value for key, value in case.items() if key != "targets"}
    if case.get("symmetric"):
        k = k[: q.shape[0]]
    if case.get("targets"):
        kwargs["targets"] = targets
    return mk.contrastive_loss(q, k, backend=backend, process_group=process_group, **kwargs)


def _run_rank(rank, rendezvous, results, n_local, m_local):
    # A file rendezvous: a free TCP port picked by the parent can be taken before the ranks bind it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    q, k, local_targets, s, t, weights = _global_inputs(0, n_local, m_local)
    n_start, m_start = _starts(n_local), _starts(m_local)
    rows = slice(n_start[rank], n_start[rank] + n_local[rank])
    cols = slice(m_start[rank], m_start[rank] + m_local[rank])
    out = {}
    global_inputs = q, k, s, t
    for backend in BACKENDS:
        q, k, s, t = (x.to(_dtype(backend)) for x in global_inputs)
        for i, case in enumerate(CONTRASTIVE_CASES):
            ql, kl = q[rows].clone().requires_grad_(), k[cols].clone().requires_grad_()
            value = _contrastive(ql, kl, local_targets[rank], case, backend, rank, dist.group.WORLD)
            objective = (value * weights[rows]).sum() if case.get("reduction") == "none" else value
            dq, dk = torch.autograd.grad(objective, (ql, kl))
            out[("contrastive", backend, i)] = (value.detach(), dq, dk)
        for kind, algorithm in STRUCTURE_CASES:
            sl, tl = s[rows].clone().requires_grad_(), t[rows].clone().requires_grad_()
            value = mk.structure_loss(sl, tl, kind=kind, algorithm=algorithm, temperature=0.3, backend=backend,
                                      process_group=dist.group.WORLD)
            ds, dt = torch.autograd.grad(value, (sl, tl))
            out[("structure", backend, kind, algorithm)] = (value.detach(), ds, dt)
            if algorithm == "gram":  # the gram path's forward computes only the gradients it will need
                frozen = mk.structure_loss(sl, t[rows], kind=kind, algorithm=algorithm, backend=backend,
                                           process_group=dist.group.WORLD)
                with torch.no_grad():
                    plain = mk.structure_loss(sl, tl, kind=kind, algorithm=algorithm, backend=backend,
                                              process_group=dist.group.WORLD)
                out[("structure frozen teacher", backend, kind)] = (frozen.detach(), *torch.autograd.grad(frozen, sl),
                                                                    plain.requires_grad, plain)
    try:  # no rows on any rank: the same error everywhere, never a hang
        mk.contrastive_loss(q[:0], k[:0], process_group=dist.group.WORLD)
        out["no rows"] = None
    except ValueError as error:
        out["no rows"] = str(error)
    for name, call in _disagreements(rank).items():
        try:
            call()
            out[name] = None
        except ValueError as error:
            out[name] = str(error)
    results[rank] = out
    dist.barrier()  # as tests/train/test_ddp.py: no rank tears down while the other is in a collective
    dist.destroy_process_group()


def _disagreements(rank):
    """Ranks that differ in what their collectives exchange. Before, these crashed the process
    (gloo: "size doesn't match"), would have hung, or (gram statistics of one size, (2, 3) against
    (3, 2)) returned a loss from mixed-up statistics."""
    group = dist.group.WORLD

    def rows(n, d, dtype=torch.float64, grad=True):
        return torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(rank)).requires_grad_(grad)

    widths = (2, 3) if rank == 0 else (3, 2)
    return {
        "contrastive width": lambda: mk.contrastive_loss(rows(4, 8 - rank), rows(4, 8 - rank), process_group=group),
        "gram widths": lambda: mk.structure_loss(rows(4, widths[0]), rows(4, widths[1]), kind="mse", algorithm="gram",
                                                 backend="chunked", process_group=group),
        "dtype": lambda: mk.contrastive_loss(rows(4, 8, torch.float32 if rank else torch.float64), rows(4, 8),
                                             process_group=group),
        "gradients": lambda: mk.structure_loss(rows(0 if rank else 4, 8, grad=rank == 0), rows(0 if rank else 4, 8),
                                               kind="kl", process_group=group),
        # One rank's own arguments fail their checks: before, it raised and the other waited in the
        # first collective until the group's timeout (30 minutes for gloo).
        "targets on one rank": lambda: mk.contrastive_loss(rows(4, 8), rows(4, 8), process_group=group,
                                                           targets=torch.tensor([0, 1, 2, 3 + 6 * rank])),
        "symmetric on one rank": lambda: mk.contrastive_loss(rows(4, 8), rows(4 + rank, 8), symmetric=True,
                                                             process_group=group),
        "structure rows on one rank": lambda: mk.structure_loss(rows(4, 8), rows(4 + rank, 8), process_group=group),
        # Settings that differ: a mixed loss, or (the algorithm) other collectives on each rank.
        "temperature": lambda: mk.contrastive_loss(rows(4, 8), rows(4, 8), temperature=0.05 * (1 + rank),
                                                   process_group=group),
        "algorithm": lambda: mk.structure_loss(rows(4, 8), rows(4, 8), algorithm="gram" if rank else "tile",
                                               process_group=group),
    }


DISAGREEMENTS = {
    "contrastive width": "every rank must pass the same student's width D, got [8, 7] on ranks 0..1",
    "gram widths": "every rank must pass the same student's width D, got [2, 3] on ranks 0..1",
    "dtype": "every rank must pass student in the same dtype; this rank's is torch.float",
    "gradients": "student must need gradients on every rank or on none (requires_grad with grad mode on), got "
                 "[True, False] on ranks 0..1",
    # (rank 0's error, rank 1's): rank 1's own, and on rank 0 one that names rank 1
    "targets on one rank": ("the arguments of rank(s) [1] failed their checks", "targets must lie in [0, 4)"),
    "symmetric on one rank": ("the arguments of rank(s) [1] failed their checks",
                              "symmetric=True needs as many teacher rows as student rows, got N=4 and M=5"),
    "structure rows on one rank": ("the arguments of rank(s) [1] failed their checks",
                                   "student and teacher must have the same number of rows N"),
    "temperature": "every rank must pass the same settings; this rank's are temperature=0.",
    "algorithm": "every rank must pass the same settings; this rank's are kind='pearson', temperature=1.0",
}


@pytest.mark.parametrize("name", list(DISAGREEMENTS))
def test_ranks_that_disagree_get_one_error_each(layout, name):
    _, _, rank_results = layout
    want = DISAGREEMENTS[name]
    for r in range(WORLD):
        expected = want[r] if isinstance(want, tuple) else want
        assert rank_results[r][name] is not None and expected in rank_results[r][name], rank_results[r][name]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    """(student rows per rank, teacher rows per rank, every rank's results)."""
    n_local, m_local = LAYOUTS[request.param]
    rendezvous = tmp_path_factory.mktemp("rendezvous") / "file"
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_run_rank, args=(str(rendezvous), results, n_local, m_local), nprocs=WORLD, start_method="spawn")
    return n_local, m_local, dict(results)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_index", range(len(CONTRASTIVE_CASES)))
def test_contrastive_across_ranks_equals_one_process(layout, backend, case_index):
    n_local, m_local, rank_results = layout
    n_start, m_start = _starts(n_local), _starts(m_local)
    case = CONTRASTIVE_CASES[case_index]
    q, k, local_targets, _, _, weights = _global_inputs(0, n_local, m_local)
    q, k = _rounded(q, backend).requires_grad_(), _rounded(k, backend).requires_grad_()
    tol = TOLERANCE[_dtype(backend)]
    global_targets = torch.cat([t + m_start[r] for r, t in enumerate(local_targets)])
    if case.get("symmetric"):
        # Column j's positive is student row j: the teacher rows of the symmetric case are the first
        # n_local[r] of each rank's block.
        k_sym = torch.cat([k[m_start[r] : m_start[r] + n_local[r]] for r in range(WORLD)])
        value = mk.contrastive_loss(q, k_sym, backend="reference", symmetric=True)
    else:
        kwargs = {key: v for key, v in case.items() if key != "targets"}
        value = mk.contrastive_loss(q, k, backend="reference", targets=global_targets if case.get("targets") else
                                    torch.cat([torch.arange(n_local[r]) + m_start[r] for r in range(WORLD)]), **kwargs)
    none = case.get("reduction") == "none"
    objective = (value * weights).sum() if none else value
    dq, dk = torch.autograd.grad(objective, (q, k))
    per_rank = [rank_results[r][("contrastive", backend, case_index)] for r in range(WORLD)]
    if none:
        assert rel_err(torch.cat([v for v, _, _ in per_rank]), value) <= tol
    else:
        assert rel_err(torch.stack([v for v, _, _ in per_rank]).mean(), value) <= tol
    scale = 1 if none else WORLD  # each rank's gradient is W·∂L/∂(its rows); DDP averages
    assert rel_err(torch.cat([g for _, g, _ in per_rank]) / scale, dq) <= tol
    assert rel_err(torch.cat([g for _, _, g in per_rank]) / scale, dk) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,algorithm", STRUCTURE_CASES)
def test_structure_across_ranks_equals_one_process(layout, backend, kind, algorithm):
    n_local, m_local, rank_results = layout
    _, _, _, s, t, _ = _global_inputs(0, n_local, m_local)
    s, t = _rounded(s, backend).requires_grad_(), _rounded(t, backend).requires_grad_()
    tol = TOLERANCE[_dtype(backend)]
    value = mk.structure_loss(s, t, kind=kind, temperature=0.3, backend="reference")
    ds, dt = torch.autograd.grad(value, (s, t))
    per_rank = [rank_results[r][("structure", backend, kind, algorithm)] for r in range(WORLD)]
    assert rel_err(torch.stack([v for v, _, _ in per_rank]).mean(), value) <= tol
    assert rel_err(torch.cat([g for _, g, _ in per_rank]) / WORLD, ds) <= tol
    assert rel_err(torch.cat([g for _, _, g in per_rank]) / WORLD, dt) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "pearson"])
def test_gram_across_ranks_with_a_frozen_teacher_and_without_gradients(layout, backend, kind):
    n_local, m_local, rank_results = layout
    _, _, _, s, t, _ = _global_inputs(0, n_local, m_local)
    s, t = _rounded(s, backend).requires_grad_(), _rounded(t, backend)
    tol = TOLERANCE[_dtype(backend)]
    value = mk.structure_loss(s, t, kind=kind, backend="reference")
    (ds,) = torch.autograd.grad(value, s)
    per_rank = [rank_results[r][("structure frozen teacher", backend, kind)] for r in range(WORLD)]
    assert rel_err(torch.stack([v for v, *_ in per_rank]).mean(), value) <= tol
    assert rel_err(torch.cat([g for _, g, *_ in per_rank]) / WORLD, ds) <= tol
    assert not any(needs_grad for *_, needs_grad, _ in per_rank)  # under no_grad: the value alone
    assert rel_err(torch.stack([v for *_, v in per_rank]).mean(), value) <= tol


def test_no_rows_on_any_rank_is_an_error_on_every_rank(layout):
    _, _, rank_results = layout
    for r in range(WORLD):
        assert "at least one row on some rank, got [0, 0]" in rank_results[r]["no rows"]
