"""The public losses: argument checks, then dispatch to a backend, then one shared reduction.

Every backend returns per-row losses whose mean over the (global) rows is the loss; the reduction
and the cross-rank scaling happen here, once, for all of them.
"""

import math
import numbers

import torch

from . import backends, distributed, reference
from . import ops  # noqa: F401  (registers the chunked backend's custom ops)
from .segment import segment_mean as _segment_mean

backends.load_optional_backends()

REDUCTIONS = ("mean", "sum", "none")
KINDS = ("pearson", "mse", "kl")
ALGORITHMS = ("auto", "tile", "gram")
MIN_ROWS = {"pearson": 3, "mse": 2, "kl": 2}


# --------------------------------------------------------------------------------------------------
# Argument checks: each error names the argument and what it got.
# --------------------------------------------------------------------------------------------------


def _check_embeddings(name: str, x, allow_no_rows: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, width), got shape {tuple(x.shape)}")
    if x.shape[1] == 0 or (x.shape[0] == 0 and not allow_no_rows):
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")


def _check_pair(student, teacher, process_group=None) -> None:
    """Across ranks, a rank may hold no rows (a batch without word links); the rows of all ranks
    together are checked once their counts are known (distributed.py)."""
    _check_embeddings("student", student, allow_no_rows=process_group is not None)
    _check_embeddings("teacher", teacher, allow_no_rows=process_group is not None)
    if student.device != teacher.device:
        raise ValueError(f"student and teacher must be on one device, got {student.device} and {teacher.device}")


def _resolve(backend, student, teacher) -> str:
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    return backends.resolve(backend, student.device, dtype)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    # Comparisons, not math.isfinite, which torch.compile(dynamic=True) cannot trace.
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 1.0 / temperature < math.inf:
        raise ValueError(f"temperature must be a number whose reciprocal (the logits' scale) is finite, got {temperature}")
    return float(temperature)


def _raise_on_every_rank(process_group, error: Exception) -> None:
    """With ``process_group``, a rank's failed argument check must not leave the other ranks waiting
    in the first collective: this rank joins it as failed (distributed.gather_layout) and every rank
    raises. Without a process group, or without torch.distributed, it returns: the caller raises."""
    if process_group is not None and distributed.is_initialized():
        distributed.gather_layout(process_group, None, None, error=error)


def _check_flag(name: str, value) -> None:
    """A switch must be a bool: the reference read the string "no" as true, the ops' schemas refused it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_targets(targets, n: int, m: int, device: torch.device) -> torch.Tensor:
    if targets is None:
        if m < n:
            raise ValueError(
                f"teacher must have at least as many rows as student when targets=None (row i's positive "
                f"is teacher row i), got student {n} rows and teacher {m} rows"
            )
        return torch.arange(n, device=device)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of int64 or None, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 or int32 tensor, got dtype {targets.dtype}")
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},) (one per student row), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets must be on the inputs' device {device}, got {targets.device}")
    if torch.compiler.is_compiling():
        # Reading the values would break the graph; an assert in it fails the call (on a GPU, as an
        # out-of-range index does in PyTorch's own losses) where a kernel would read past its rows.
        torch._assert_async(((targets >= 0) & (targets < m)).all(), f"targets must lie in [0, {m}) (teacher rows)")
    elif n > 0:
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= m:
            raise ValueError(f"targets must lie in [0, {m}) (teacher rows), got values in [{low}, {high}]")
    return targets.long().contiguous()  # the fused kernels read it as one row of int64s


# --------------------------------------------------------------------------------------------------
# Contrastive loss
# --------------------------------------------------------------------------------------------------


def contrastive_rows(q, k, targets, temperature: float, symmetric: bool, normalize: bool, backend: str):
    """Per-row losses (N,) of the contrastive loss on one process, by a resolved backend name."""
    if backend == "reference":
        return reference.contrastive_rows(q, k, targets, temperature, symmetric, normalize)
    op = getattr(torch.ops, backends.NAMESPACES[backend]).contrastive_forward
    row_loss, col_loss, _, _ = op(q, k, targets, 1.0 / temperature, normalize, symmetric)
    return (row_loss + col_loss) / 2 if symmetric else row_loss


def contrastive_sum(q, k, targets, temperature: float, symmetric: bool, normalize: bool, backend: str):
    """The sum of the per-row losses.

    When autograd will need gradients of a one-directional loss, a fused backend computes them inside
    the forward (DESIGN §5): the backward is then a scale, and no row block is computed twice.
    """
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if backend != "reference" and not symmetric and wants_grad:
        op = getattr(torch.ops, backends.NAMESPACES[backend]).contrastive_forward_with_grad
        loss_sum, _, _ = op(q, k, targets, 1.0 / temperature, normalize, q.requires_grad, k.requires_grad)
        return loss_sum
    return contrastive_rows(q, k, targets, temperature, symmetric, normalize, backend).sum()


def contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 0.05,
    targets: torch.Tensor | None = None,
    symmetric: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """InfoNCE of student rows against teacher rows (DESIGN §1.1).

    student: (N, D), teacher: (M, D) floating point, one device; targets: (N,) int64 in [0, M),
    default arange(N) (needs M ≥ N). z_ij = ⟨q̂_i, k̂_j⟩ / temperature and
    ℓ_i = logsumexp_j z_ij − z_{i,targets_i}. ``symmetric`` (M == N, targets None) averages each
    row's loss with its column's. Returns a float32 scalar (float64 for float64 inputs), or the
    (N,) per-row losses with ``reduction="none"``. Gradients reach whichever input requires them.

    With ``process_group``, each rank passes its local rows (N and M may differ from rank to rank);
    the teacher rows of every rank are the columns, and the returned value is scaled so that the mean
    of it over ranks is the global-batch loss and DDP's gradient averaging gives its gradient.
    ``targets`` are then local: indices into this rank's own teacher rows (offset to the gathered
    columns inside). With ``reduction="none"`` the per-row losses are returned as they are, unscaled.
    Every rank must pass the same settings (temperature, symmetric, normalize, reduction); one rank's
    invalid arguments raise on every rank, not in the others' next collective.
    """
    try:
        _check_pair(student, teacher, process_group)
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"student and teacher must have the same width D, got student {tuple(student.shape)} "
                f"and teacher {tuple(teacher.shape)}"
            )
        temperature = _check_temperature(temperature)
        _check_flag("symmetric", symmetric)
        _check_flag("normalize", normalize)
        _check_choice("reduction", reduction, REDUCTIONS)
        n, m = student.shape[0], teacher.shape[0]
        if symmetric:
            if targets is not None:
                raise ValueError("symmetric=True pairs row i with column i: targets must be None")
            if m != n:
                raise ValueError(f"symmetric=True needs as many teacher rows as student rows, got N={n} and M={m}")
        targets = _check_targets(targets, n, m, student.device)
        name = _resolve(backend, student, teacher)
    except (ValueError, TypeError) as error:
        _raise_on_every_rank(process_group, error)
        raise

    def local(q, k, targets, symmetric):
        if reduction == "none":
            return contrastive_rows(q, k, targets, temperature, symmetric, normalize, name)
        return contrastive_sum(q, k, targets, temperature, symmetric, normalize, name)

    if process_group is not None:
        settings = f"temperature={temperature}, symmetric={symmetric}, normalize={normalize}, reduction={reduction!r}"
        return distributed.contrastive_loss(student, teacher, targets, symmetric, reduction, process_group, local,
                                            settings)
    value = local(student, teacher, targets, symmetric)
    return value / n if reduction == "mean" else value


# --------------------------------------------------------------------------------------------------
# Structure loss
# --------------------------------------------------------------------------------------------------


def choose_algorithm(kind: str, algorithm: str, n: int, ds: int, dt: int) -> str:
    """``auto``: gram when it needs less work, and kl is tile only. Gram takes 4·N·(Ds+Dt)² FLOPs in
    float64 (gram.py says why), counted as two float32 ones each (the rate of float64 GEMMs on CPUs),
    against the tile's 2·N²·(Ds+Dt): gram from N > 4·(Ds+Dt) on."""
    if algorithm != "auto":
        return algorithm
    if kind == "kl":
        return "tile"
    return "gram" if 2 * 4 * n * (ds + dt) ** 2 < 2 * n * n * (ds + dt) else "tile"


def structure_rows(s, t, kind: str, temperature: float, normalize: bool, algorithm: str, backend: str,
                   row_start: int = 0, row_count: int | None = None):
    """Per-row losses of rows [row_start, row_start + row_count) against all N columns.

    Row ranges serve the tile path across ranks; the gram path always returns every row.
    """
    row_count = s.shape[0] - row_start if row_count is None else row_count
    if backend == "reference":
        rows = reference.structure_rows(s, t, kind, temperature, normalize)
        return rows[row_start : row_start + row_count]
    ops_ = getattr(torch.ops, backends.NAMESPACES[backend])
    if algorithm == "gram":
        return ops_.structure_gram_forward(s, t, kind, normalize)
    return ops_.structure_tile_forward(s, t, kind, 1.0 / temperature, normalize, row_start, row_count)


def structure_sum(s, t, kind: str, temperature: float, normalize: bool, algorithm: str, backend: str,
                  row_start: int = 0, row_count: int | None = None):
    """The sum of ``structure_rows``; with gradients wanted, a fused backend computes them inside the
    forward (the loss is a mean, so every row's gradient weight is the same)."""
    wants_grad = torch.is_grad_enabled() and (s.requires_grad or t.requires_grad)
    if backend == "reference" or not wants_grad:
        return structure_rows(s, t, kind, temperature, normalize, algorithm, backend, row_start, row_count).sum()
    ops_ = getattr(torch.ops, backends.NAMESPACES[backend])
    if algorithm == "gram":
        loss_sum, _, _ = ops_.structure_gram_forward_with_grad(s, t, kind, normalize, s.requires_grad, t.requires_grad)
        return loss_sum
    row_count = s.shape[0] - row_start if row_count is None else row_count
    loss_sum, _, _ = ops_.structure_tile_forward_with_grad(
        s, t, kind, 1.0 / temperature, normalize, row_start, row_count, s.requires_grad, t.requires_grad
    )
    return loss_sum


def structure_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str = "pearson",
    temperature: float = 1.0,
    normalize: bool = True,
    algorithm: str = "auto",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """How far the student's similarity structure is from the teacher's (DESIGN §1.2).

    student: (N, Ds), teacher: (N, Dt): the widths may differ, the N×N similarity matrices
    G^S = ŝŝᵀ and G^T = t̂t̂ᵀ are compared over pairs i ≠ j. ``kind``: "pearson" (1 − mean row
    correlation, N ≥ 3), "mse" (mean squared difference, N ≥ 2), "kl" (mean KL of the teacher's
    row softmax at ``temperature`` to the student's, N ≥ 2). ``algorithm``: "tile" (O(N²·D) work,
    O(N) memory), "gram" (mse/pearson only, O(N·D²) work), "auto" (the cheaper). Returns a float32
    scalar (float64 for float64 inputs).

    With ``process_group``, each rank passes its local rows (N may differ from rank to rank) and gets
    the loss of the global batch, scaled as in ``contrastive_loss``. Every rank must pass the same
    settings (kind, temperature, normalize, algorithm); one rank's invalid arguments raise on every
    rank.
    """
    try:
        _check_pair(student, teacher, process_group)
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"student and teacher must have the same number of rows N, got student {tuple(student.shape)} "
                f"and teacher {tuple(teacher.shape)}"
            )
        _check_choice("kind", kind, KINDS)
        _check_choice("algorithm", algorithm, ALGORITHMS)
        _check_flag("normalize", normalize)
        temperature = _check_temperature(temperature)
        if kind == "kl" and algorithm == "gram":
            raise ValueError("algorithm='gram' exists for kind='mse' and kind='pearson' only; kind='kl' needs 'tile'")
        name = _resolve(backend, student, teacher)
    except (ValueError, TypeError) as error:
        _raise_on_every_rank(process_group, error)
        raise
    counts = None
    if process_group is not None:
        settings = f"kind={kind!r}, temperature={temperature}, normalize={normalize}, algorithm={algorithm!r}"
        counts = distributed.gather_layout(process_group, student, teacher, settings)[:, 0].tolist()
    n_total = student.shape[0] if counts is None else sum(counts)
    if n_total < MIN_ROWS[kind]:
        raise ValueError(f"kind={kind!r} needs at least {MIN_ROWS[kind]} rows in the batch, got N={n_total}")
    algorithm = choose_algorithm(kind, algorithm, n_total, student.shape[1], teacher.shape[1])
    if process_group is not None:
        return distributed.structure_loss(
            student, teacher, kind, temperature, normalize, algorithm, name, process_group, counts, structure_sum
        )
    return structure_sum(student, teacher, kind, temperature, normalize, algorithm, name) / n_total


# --------------------------------------------------------------------------------------------------
# Segment mean
# --------------------------------------------------------------------------------------------------


def segment_mean(hidden: torch.Tensor, segment_ids: torch.Tensor, *, num_segments: int | None = None) -> torch.Tensor:
    """Word vectors from sub-word states: the mean of the rows of ``hidden`` sharing a segment id.

    hidden: (T, D) or (B, L, D) floating point; segment_ids: (T,) or (B, L) integer, the same
    leading shape, ids in [0, num_segments) or negative to ignore a row (padding, special tokens).
    Returns (num_segments, D) in hidden's dtype; empty segments are zero. ``num_segments`` defaults
    to max(segment_ids) + 1, which reads the ids back from the device: pass it under torch.compile.
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point torch.Tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer torch.Tensor, got {getattr(segment_ids, 'dtype', type(segment_ids))}")
    if hidden.dim() not in (2, 3) or segment_ids.shape != hidden.shape[:-1]:
        raise ValueError(
            f"hidden must be (T, D) or (B, L, D) and segment_ids its leading shape, got hidden "
            f"{tuple(hidden.shape)} and segment_ids {tuple(segment_ids.shape)}"
        )
    if segment_ids.device != hidden.device:
        raise ValueError(f"segment_ids must be on hidden's device {hidden.device}, got {segment_ids.device}")
    ids = segment_ids.reshape(-1).long()
    if num_segments is None:
        num_segments = max(int(ids.max()) + 1, 0) if ids.numel() else 0  # every id negative (-100): none
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
    if not torch.compiler.is_compiling() and ids.numel() and int(ids.max()) >= num_segments:
        raise ValueError(f"segment_ids must be < num_segments={num_segments}, got max {int(ids.max())}")
    return _segment_mean(hidden.reshape(-1, hidden.shape[-1]), ids, max(num_segments, 0))
