"""The losses across data-parallel ranks, exact over the global batch (DESIGN §1.2 "Across ranks").

Each rank holds its local rows (the same count on every rank). Values are scaled by open_clip's
``local_loss`` convention: rank r returns L_r with Σ_r L_r = W·L (W ranks, L the global-batch
loss), and its backward gives ∂(Σ_r L_r)/∂(its own inputs). DDP then averages the gradients over
ranks, which is exactly ∇L; the mean over ranks of the returned values is L.

- contrastive: every rank's teacher rows are all-gathered with gradient (O(N·D) traffic) and are
  the columns of the local rows; ``symmetric`` adds the columns' losses against the gathered
  student rows.
- structure, gram (mse/pearson): only the D×D statistics and column sums are all-reduced, in forward
  and (their gradients) in backward: O(D²) traffic however large N is.
- structure, tile (kl, or on request): the rows are all-gathered with gradient and the local rows are
  computed against all columns.
"""

import torch
import torch.distributed as dist

from . import gram
from .reference import accumulation_dtype, l2_normalize


class _AllGather(torch.autograd.Function):
    """(n, ...) on each rank -> (W·n, ...) in rank order; backward sums the gradients of all ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        n = grad.shape[0] // world
        return grad[rank * n : (rank + 1) * n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather along dim 0 whose backward returns each rank the summed gradient of its rows."""
    return _AllGather.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """A summed copy of ``x`` over the ranks of ``group`` (no autograd)."""
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _check_group(group, **local_sizes: int) -> int:
    """The world size; ValueError unless torch.distributed is up and every rank has the same sizes."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized (init_process_group)")
    world = dist.get_world_size(group)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    sizes = torch.tensor(list(local_sizes.values()), device=device)
    gathered = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(gathered, sizes, group=group)
    if any(not torch.equal(g, sizes) for g in gathered):
        names = ", ".join(local_sizes)
        raise ValueError(
            f"with process_group every rank must pass the same number of rows ({names}); got "
            f"{[g.tolist() for g in gathered]} across ranks"
        )
    return world


def contrastive_loss(q, k, targets, symmetric, reduction, group, local):
    """Local rows against every rank's teacher rows. ``local(q, k, targets, symmetric)`` is the
    one-process loss: per-row losses for reduction "none", else their sum."""
    world = _check_group(group, student_rows=q.shape[0], teacher_rows=k.shape[0])
    rank = dist.get_rank(group)
    n, m = q.shape[0], k.shape[0]
    value = local(q, all_gather_with_grad(k, group), targets + rank * m, False)
    if symmetric:
        own = torch.arange(n, device=q.device) + rank * n
        value = (value + local(k, all_gather_with_grad(q, group), own, False)) / 2
    if reduction == "none":
        return value
    total = value * world
    return total if reduction == "sum" else total / (world * n)


class _GramAcrossRanks(torch.autograd.Function):
    """Per-row gram losses of the local rows over the global batch; statistics all-reduced."""

    @staticmethod
    def forward(ctx, x, y, kind, n_total, group):
        ctx.kind, ctx.n_total, ctx.group = kind, n_total, group
        ctx.save_for_backward(x, y)
        return gram.gram_forward(x, y, kind, n_total, lambda v: all_reduce_sum(v, group))

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        _, dx, dy = gram.gram_backward(
            grad, x, y, ctx.kind, ctx.n_total, need_x, need_y, lambda v: all_reduce_sum(v, ctx.group)
        )
        return dx, dy, None, None, None


def structure_loss(s, t, kind, temperature, normalize, algorithm, backend, group, sum_fn):
    """The global-batch structure loss from local rows, ``algorithm`` resolved ("tile" or "gram");
    ``sum_fn`` is functional.structure_sum."""
    world = _check_group(group, rows=s.shape[0])
    n = s.shape[0]
    n_total = world * n
    if algorithm == "gram" and backend != "reference":
        acc = accumulation_dtype(s, t)
        x, y = s.to(acc), t.to(acc)
        if normalize:
            x, y = l2_normalize(x), l2_normalize(y)
        total = _GramAcrossRanks.apply(x, y, kind, n_total, group).sum()
    else:
        s_all, t_all = all_gather_with_grad(s, group), all_gather_with_grad(t, group)
        total = sum_fn(s_all, t_all, kind, temperature, normalize, "tile", backend,
                       row_start=dist.get_rank(group) * n, row_count=n)
    return total * world / n_total
