"""The losses across data-parallel ranks, exact over the global batch (DESIGN §1.2 "Across ranks").

Each rank holds its local rows; the counts may differ from rank to rank (a word or token level has
as many rows as the rank's batch has words or tokens), and a rank may hold none. Rank r's rows come
after those of ranks 0..r−1 in the global batch. Values are scaled by open_clip's ``local_loss``
convention: rank r returns L_r with Σ_r L_r = W·L (W ranks, L the global-batch loss), and its
backward gives ∂(Σ_r L_r)/∂(its own inputs). DDP then averages the gradients over ranks, which is
exactly ∇L; the mean over ranks of the returned values is L.

- contrastive: every rank's teacher rows are all-gathered with gradient (O(N·D) traffic) and are
  the columns of the local rows; ``symmetric`` adds the columns' losses against the gathered
  student rows.
- structure, gram (mse/pearson): only the D×D statistics and column sums are all-reduced, in forward
  and (their gradients) in backward: O(D²) traffic however large N is.
- structure, tile (kl, or on request): the rows are all-gathered with gradient and the local rows are
  computed against all columns.
"""

import zlib

import torch
import torch.distributed as dist

from . import gram
from .reference import accumulation_dtype


def _collective_device(group) -> str:
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def row_counts(group, *local: int) -> torch.Tensor:
    """(W, len(local)) int64 on the CPU: every rank's ``local`` counts, in rank order.

    ValueError when torch.distributed is not initialized (the argument ``process_group`` names it).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized (init_process_group)")
    counts = torch.tensor(local, dtype=torch.int64, device=_collective_device(group))
    gathered = [torch.empty_like(counts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, counts, group=group)
    return torch.stack(gathered).cpu()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_layout(group, student: torch.Tensor | None, teacher: torch.Tensor | None, settings: str = "",
                  error: Exception | None = None) -> torch.Tensor:
    """(W, 2) int64 on the CPU: every rank's (student rows, teacher rows), in rank order.

    In the same collective, the ranks compare what their collectives will exchange: the widths, the
    dtypes, and which inputs need gradients (a rank whose inputs need none runs no collective in
    backward, and the others would wait for it). A difference is a ValueError on every rank, instead
    of a crash, a hang, or (statistics of equal size but other widths) a wrong loss. They also
    compare ``settings`` (the loss's other arguments, which must agree: a temperature that differs
    mixes two losses, an algorithm that differs runs other collectives).

    ``error``: this rank's arguments failed their checks (the inputs are then not read). Every rank
    joins this collective before its first other one, so a rank's bad arguments are raised on every
    rank, its own error there and a ValueError naming it on the others, where the others would
    otherwise wait in a collective until the group's timeout.
    """
    grad = torch.is_grad_enabled()
    if error is None:
        values = (student.shape[0], teacher.shape[0], student.shape[1], teacher.shape[1],
                  zlib.crc32(str(student.dtype).encode()), zlib.crc32(str(teacher.dtype).encode()),
                  int(grad and student.requires_grad), int(grad and teacher.requires_grad))
    else:
        values = (0,) * 8
    layout = row_counts(group, *values, int(error is not None), zlib.crc32(settings.encode()))
    failed = [rank for rank, flag in enumerate(layout[:, 8].tolist()) if flag]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"process_group: the arguments of rank(s) {failed} failed their checks (their error says "
                         "how); every rank raises")
    if len(set(layout[:, 9].tolist())) > 1:
        raise ValueError(f"process_group: every rank must pass the same settings; this rank's are {settings}, and "
                         "another rank's differ")
    agreed = (("student's width D", 2), ("teacher's width D", 3))
    for what, column in agreed:
        values = layout[:, column].tolist()
        if len(set(values)) > 1:
            raise ValueError(f"process_group: every rank must pass the same {what}, got {values} on ranks "
                             f"0..{len(values) - 1}")
    for name, x, column in (("student", student, 4), ("teacher", teacher, 5)):
        if len(set(layout[:, column].tolist())) > 1:
            raise ValueError(f"process_group: every rank must pass {name} in the same dtype; this rank's is {x.dtype} "
                             "and another rank's differs")
    for name, column in (("student", 6), ("teacher", 7)):
        values = [bool(v) for v in layout[:, column].tolist()]
        if len(set(values)) > 1:
            raise ValueError(
                f"process_group: {name} must need gradients on every rank or on none (requires_grad with grad mode "
                f"on), got {values} on ranks 0..{len(values) - 1}; a rank without rows too: pass it a (0, D) slice "
                "of the model's output, or an empty tensor with requires_grad_()"
            )
    return layout[:, :2]


class _AllGather(torch.autograd.Function):
    """(n_r, ...) on rank r -> (Σ n_r, ...) in rank order; backward sums the gradients of all ranks
    and returns each rank the rows it gave. Ranks with fewer rows are padded for the transfer."""

    @staticmethod
    def forward(ctx, x, group, counts):
        ctx.group, ctx.counts = group, counts
        top = max(counts)
        padded = x if x.shape[0] == top else torch.cat([x, x.new_zeros(top - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.counts[:rank])
        return grad[start : start + ctx.counts[rank]], None, None


def all_gather_with_grad(x: torch.Tensor, group=None, counts: list[int] | None = None) -> torch.Tensor:
    """All-gather along dim 0 whose backward returns each rank the summed gradient of its rows.

    x: (n_r, ...) on rank r, the same trailing shape and dtype everywhere; returns (Σ_r n_r, ...).
    ``counts`` (every rank's n_r, in rank order) saves one collective when the caller knows them.
    """
    if counts is None:
        counts = row_counts(group, x.shape[0])[:, 0].tolist()
    return _AllGather.apply(x, group, list(counts))


class _ZeroFrom(torch.autograd.Function):
    """A zero scalar that depends on its inputs: a rank without rows of its own still passes the
    (zero) gradients of the gathered rows back, so the collectives of the backward run on every
    rank. Zero by construction, not 0·x, which would turn another rank's inf into NaN here."""

    @staticmethod
    def forward(ctx, dtype, *xs):
        ctx.likes = [(x.shape, x.dtype, x.device) for x in xs]
        return xs[0].new_zeros((), dtype=dtype)

    @staticmethod
    def backward(ctx, _grad):
        return None, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.likes)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """A summed copy of ``x`` over the ranks of ``group`` (no autograd)."""
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def contrastive_loss(q, k, targets, symmetric, reduction, group, local, settings):
    """Local rows against every rank's teacher rows. ``local(q, k, targets, symmetric)`` is the
    one-process loss: per-row losses for reduction "none", else their sum; ``settings`` as in
    ``gather_layout``."""
    counts = gather_layout(group, q, k, settings)
    world, rank = counts.shape[0], dist.get_rank(group)
    n_counts, m_counts = counts[:, 0].tolist(), counts[:, 1].tolist()
    n_total = sum(n_counts)
    if n_total == 0:
        raise ValueError(f"student must have at least one row on some rank, got {n_counts} rows across ranks")
    k_all = all_gather_with_grad(k, group, m_counts)
    q_all = all_gather_with_grad(q, group, n_counts) if symmetric else None
    if q.shape[0] == 0:
        zero = _ZeroFrom.apply(accumulation_dtype(q, k), q, *(x for x in (k_all, q_all) if x is not None))
        value = zero.expand(0) if reduction == "none" else zero
    else:
        value = local(q, k_all, targets + sum(m_counts[:rank]), False)
        if symmetric:
            own = torch.arange(q.shape[0], device=q.device) + sum(n_counts[:rank])
            value = (value + local(k, q_all, own, False)) / 2
    if reduction == "none":
        return value
    total = value * world
    return total if reduction == "sum" else total / n_total


class _GramAcrossRanks(torch.autograd.Function):
    """The summed gram loss of the local rows over the global batch; statistics all-reduced.

    Where gradients will be needed (``need_s``, ``need_t``: the same on every rank, whose
    collectives must match), the forward computes them with the loss, in one pass over the
    statistics as the one-process ``*_forward_with_grad`` ops do, and the backward scales them."""

    @staticmethod
    def forward(ctx, s, t, kind, n_total, normalize, group, need_s, need_t):
        def reduce(v):
            return all_reduce_sum(v, group)

        ctx.dtypes = s.dtype, t.dtype
        if not (need_s or need_t):
            ctx.save_for_backward(None, None)
            return gram.gram_forward(s, t, kind, n_total, normalize, reduce).sum()
        ones = s.new_ones(s.shape[0], dtype=accumulation_dtype(s, t))
        losses, ds, dt = gram.gram_backward(ones, s, t, kind, n_total, normalize, need_s, need_t, reduce)
        ctx.save_for_backward(ds, dt)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad):
        grads = [None if g is None else (g * grad).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None, None, None, None, None


def structure_loss(s, t, kind, temperature, normalize, algorithm, backend, group, counts, sum_fn):
    """The global-batch structure loss from local rows, ``algorithm`` resolved ("tile" or "gram");
    ``counts`` is every rank's row count (``row_counts``), ``sum_fn`` is functional.structure_sum."""
    world, rank = len(counts), dist.get_rank(group)
    n_total = sum(counts)
    if algorithm == "gram" and backend != "reference":
        grad = torch.is_grad_enabled()
        total = _GramAcrossRanks.apply(s, t, kind, n_total, normalize, group, grad and s.requires_grad,
                                       grad and t.requires_grad)
    else:
        s_all, t_all = all_gather_with_grad(s, group, counts), all_gather_with_grad(t, group, counts)
        if counts[rank] == 0:
            total = _ZeroFrom.apply(accumulation_dtype(s, t), s, t, s_all, t_all)
        else:
            total = sum_fn(s_all, t_all, kind, temperature, normalize, "tile", backend,
                           row_start=sum(counts[:rank]), row_count=counts[rank])
    return total * world / n_total
