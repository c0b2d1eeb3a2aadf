"""Fused Triton kernels of the contrastive loss (DESIGN §1.1): z = scale · Â B̂ᵀ, never stored.

Two kernels serve every direction, because z is the same matrix read by rows or by columns:

- ``_lse_kernel`` streams over column tiles of z for a block of rows with an online
  log-sum-exp (flash-attention style) and picks each row's target logit in the same pass; the sum
  leaves the target out, so a nearly aligned pair's small loss is log1p(Σ_{j≠t} e^{z_j − z_t})
  with its digits (lse − z_t would cancel them). Run on
  (q, k) it gives the row statistics; for the symmetric loss the column statistics come from the
  same pass (fixed-shift sums added atomically, where z is bounded) or from a run on (k, q) with
  targets = arange.
- ``_lse_grad_kernel`` is ``_lse_kernel`` that also accumulates the row term of the gradient,
  flash-attention style: Σ_{b≠t} e^{z_ab − max} B̂_b rescaled whenever the running max moves (or,
  where z is bounded, under a fixed shift that never moves), so a forward with gradients for the
  rows' side costs one pass (z and P·B̂), not a pass for the statistics and another that
  recomputes z. Each program owns up to three BLOCK_DO-wide
  accumulators (BLOCK_A × 384 floats fit in an H100's registers, BLOCK_A × 768 do not), so z is
  computed once at D ≤ 384 and once per span of D beyond: the autotuner weighs wider spans
  against register pressure.
- ``_grad_kernel`` recomputes z tiles and accumulates dÂ_a = scale · Σ_b dz_ab B̂_b for a block of
  rows a, where dz has a row term g_a (softmax_b − [b = t_a]) and a column term
  g_b (softmax_a − [a = t'_b]); at a target the term is g·expm1(−ℓ), computed by the launcher,
  exact where softmax rounds to 1. Run on (q, k) it writes dq̂, on (k, q) it writes dk̂: both are
  row-parallel, so no atomics.

The L2 normalization is folded in: the kernels take the rows as they are and their inverse norms
(N floats), and scale z in the epilogue; the normalization's backward is an N×D epilogue in
PyTorch. Accumulation is float32; float32 inputs use exact ("ieee") dots, half inputs tensor cores
(float16's gradient products in TF32, which holds its small weights: tiles.accumulate_chunk).
Kernels know nothing of autograd (``ops.py``); the launchers below know the grid.
"""

import torch
import triton
import triton.language as tl

from .tiles import (accumulate_chunks, as_index, autotuned, column_split, column_tile, common_dtype, configs,
                    input_grad, inverse_norms, needs_int64_offsets, precision, size_key, span_grid, store_chunk,
                    store_chunks)

# Configs for an H100 (block sizes, warps, stages); in the unsplit kernels no bfloat16 one spills
# registers there, and three float16 ones at most 36 bytes, whose gradient products take TF32; the
# split variants of the symmetric loss's kernels spill in three configs per half dtype, at most 60
# bytes (benchmarks/triton_sm90.py, results/triton-sm90-*.md). The autotuner times them per D,
# octave of the streamed length and dtype.
_STATS = ("BLOCK_A", "BLOCK_B", "BLOCK_D")
_STATS_HALF = configs([(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
                       (64, 128, 64, 4, 4), (128, 64, 32, 4, 4)], _STATS)
_STATS_FLOAT32 = configs([(64, 64, 32, 8, 2), (64, 64, 16, 4, 2), (128, 64, 16, 8, 2)], _STATS)
# The gradient kernels: up to three 128-wide accumulators keep D = 384 in one program (z computed
# once) and D = 768 in two. The last config holds D = 768 whole with 32-row tiles instead (as
# memeff's backward does), too few rows for wgmma: Ampere-style mma, z computed once.
_GRAD = _STATS + ("BLOCK_DO", "CHUNKS")
_GRAD_HALF = configs([(64, 64, 64, 128, 3, 8, 2), (64, 64, 64, 128, 3, 8, 3), (64, 64, 32, 128, 3, 8, 3),
                      (64, 64, 64, 128, 2, 8, 2), (64, 64, 64, 256, 1, 8, 2), (64, 64, 64, 64, 2, 4, 3),
                      (32, 32, 64, 256, 3, 8, 2)], _GRAD)
_GRAD_FLOAT32 = configs([(64, 64, 32, 64, 1, 8, 2), (64, 64, 32, 64, 1, 4, 2), (64, 64, 16, 64, 1, 4, 2)], _GRAD)
_INTERPRETER = dict(BLOCK_A=64, BLOCK_B=64, BLOCK_D=64)
# Tuned per D, octave of the streamed length (a split's), dtype (Triton adds it) and kernel variant: a variant
# does other work per tile (atomics, a second term), so its best config may differ. Each kernel is
# keyed on the names it has (tiles.autotuned).
_KEY = ["d", "n_key", "COLUMNS", "FIXED_SHIFT", "SPLIT", "HAS_A_TERM", "HAS_B_TERM"]


@triton.jit
def _log1p(x):
    """log(1 + x) for x ≥ 0 without losing a small x's digits (Goldberg's correction)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _expm1(x):
    """exp(x) − 1 for x ≤ 0 without losing a small x's digits (Kahan's correction)."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (x / tl.log(u))))


@triton.jit
def _loss_from_weights(target_weight, row_other, shifted_target):
    """−log softmax at the target from its weight e^{z_t − max} and the others' Σ e^{z_b − max}:
    log1p(others / target) while the target dominates, so a nearly aligned pair keeps its digits."""
    dominant = target_weight >= row_other
    return tl.where(dominant, _log1p(row_other / tl.where(dominant, target_weight, 1.0)),
                    tl.log(target_weight + row_other) - shifted_target)


@triton.jit
def _split_columns(n_b, split_columns, AXIS: tl.constexpr, SPLIT: tl.constexpr):
    """[b_start, b_end): the columns this program streams, the split of program axis AXIS with SPLIT,
    else all of them (as plain 0 and n_b, so that the one-split kernels compile as they did before
    splits: runtime bounds cost the symmetric kernels a few registers, and spills)."""
    if SPLIT:
        b_start = tl.program_id(AXIS) * split_columns
        b_end = tl.minimum(b_start + split_columns, n_b)
    else:
        b_start = 0
        b_end = n_b
    return b_start, b_end


@triton.jit
def _store_split_statistics(PARTS, split, splits, row_max, row_other, target_logit, offs_a, mask_a, n_a,
                            INT64_OFFSETS: tl.constexpr):
    """PARTS[:, split, a] = (row_max, row_other, target_logit) of the rows' split of the columns,
    PARTS being (3, splits, n_a) float32."""
    part = PARTS + as_index(split, INT64_OFFSETS) * n_a + offs_a
    plane = as_index(splits, INT64_OFFSETS) * n_a
    tl.store(part, row_max, mask=mask_a)
    tl.store(part + plane, row_other, mask=mask_a)
    tl.store(part + 2 * plane, target_logit, mask=mask_a)


# COL_OTHER takes atomic adds: zeroed before each of the autotuner's runs.
@autotuned(_STATS_HALF, _STATS_FLOAT32, triton.Config(_INTERPRETER), _KEY, "A", reset_to_zero=("COL_OTHER",))
@triton.jit
def _lse_kernel(A, B, INV_A, INV_B, TARGETS, LSE, LOSS, PARTS, COL_OTHER, COL_TARGET, n_a, n_b, d,
                stride_a, stride_ad, stride_b, stride_bd, scale, shift, split_columns, n_key,
                COLUMNS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """Per row a: LSE[a] = logsumexp_b z_ab and LOSS[a] = LSE[a] − z_{a, TARGETS[a]}, the latter
    as log1p(other / a_t) while the target's weight a_t = e^{z_t − max} dominates the others'.

    With COLUMNS (the symmetric loss: square z, column b's target is row b), the same pass also
    gives the columns' statistics: COL_OTHER[b] += Σ_{a≠b} e^{z_ab − shift} (atomically, from every
    row block; zeroed by the caller) and COL_TARGET[b] = z_bb. A column's running max would need
    every row block at once, so the shift is fixed instead: the caller passes an upper bound of z
    (|scale| for normalized rows) and uses this only where e^{−2|scale|} stays a normal float. The
    rows then take the same shift: one exponential per element serves both sums, and no tile
    computes a row max.

    Program (i, s) streams the s-th ``split_columns`` columns (all of them where there is one
    split). With SPLIT it stores its split's statistics instead, PARTS[:, s, a] = (max,
    Σ_{b≠t} e^{z_ab − max}, z_at or 0 where the target lies in another split), which the launcher
    merges (``_merged_rows``)."""
    row0 = tl.program_id(0) * BLOCK_A
    b_start, b_end = _split_columns(n_b, split_columns, 1, SPLIT)
    offs_a = row0 + tl.arange(0, BLOCK_A)
    mask_a = offs_a < n_a
    inv_a = tl.load(INV_A + offs_a, mask=mask_a, other=0.0)
    target = tl.load(TARGETS + offs_a, mask=mask_a, other=-1)
    row_max = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    row_other = tl.zeros((BLOCK_A,), dtype=tl.float32)  # Σ_{b ≠ target} exp(z_ab − row_max)
    target_logit = tl.zeros((BLOCK_A,), dtype=tl.float32)
    if COLUMNS:
        row_max = tl.full((BLOCK_A,), shift, dtype=tl.float32)
    for b0 in range(b_start, b_end, BLOCK_B):
        offs_b, mask_b, inv_b, z = column_tile(A, B, INV_B, offs_a, mask_a, inv_a, b0, b_end, d, stride_a, stride_ad,
                                               stride_b, stride_bd, scale, BLOCK_A, BLOCK_B, BLOCK_D, PRECISION,
                                               INT64_OFFSETS)
        z = tl.where(mask_b[None, :], z, float("-inf"))
        is_target = offs_b[None, :] == target[:, None]
        if SPLIT:  # a tile may reach past its split's end into the next split, where the target may lie
            is_target = is_target & mask_b[None, :]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if COLUMNS:
            weights = tl.exp(z - shift)  # 0 past n_b
            row_other += tl.sum(tl.where(is_target, 0.0, weights), axis=1)
            diagonal = offs_a[:, None] == offs_b[None, :]
            column_terms = tl.where(mask_a[:, None] & ~diagonal, weights, 0.0)
            # relaxed: a sum whose order does not matter, read only after the launch; the default
            # acq_rel orders every add against the program's other memory accesses, for nothing.
            tl.atomic_add(COL_OTHER + offs_b, tl.sum(column_terms, axis=0), mask=mask_b, sem="relaxed")
            # The diagonal of this tile, where the row block holds column b's target row.
            holds_target = mask_b & (offs_b >= row0) & (offs_b < row0 + BLOCK_A) & (offs_b < n_a)
            tl.store(COL_TARGET + offs_b, tl.sum(tl.where(diagonal, z, 0.0), axis=0), mask=holds_target)
        else:
            new_max = tl.maximum(row_max, tl.max(z, axis=1))
            others = tl.where(is_target, 0.0, tl.exp(z - new_max[:, None]))
            row_other = row_other * tl.exp(row_max - new_max) + tl.sum(others, axis=1)
            row_max = new_max
    if SPLIT:
        _store_split_statistics(PARTS, tl.program_id(1), tl.num_programs(1), row_max, row_other, target_logit, offs_a,
                                mask_a, n_a, INT64_OFFSETS)
    else:
        shifted_target = target_logit - row_max
        target_weight = tl.exp(shifted_target)
        tl.store(LSE + offs_a, row_max + tl.log(target_weight + row_other), mask=mask_a)
        loss = _loss_from_weights(target_weight, row_other, shifted_target)
        tl.store(LOSS + offs_a, tl.where((target >= 0) & (target < n_b), loss, float("nan")), mask=mask_a)


@triton.jit
def _store_grad_chunk(DA, acc, total, target_coef, B, target, offs_a, mask_a, offs_do, d, stride_b, stride_bd,
                      scale, INT64_OFFSETS: tl.constexpr):
    """DA[a, chunk] = scale · (acc / total + target_coef · B[target, chunk])."""
    b_t = tl.load(B + as_index(target, INT64_OFFSETS)[:, None] * stride_b
                  + as_index(offs_do, INT64_OFFSETS)[None, :] * stride_bd,
                  mask=mask_a[:, None] & (offs_do < d)[None, :], other=0.0)
    store_chunk(DA, (acc / total[:, None] + target_coef[:, None] * b_t.to(tl.float32)) * scale, offs_a, mask_a,
                offs_do, d, INT64_OFFSETS)


@autotuned(_GRAD_HALF, _GRAD_FLOAT32, triton.Config(dict(_INTERPRETER, BLOCK_DO=64, CHUNKS=2)), _KEY, "A")
@triton.jit
def _lse_grad_kernel(A, B, INV_A, INV_B, TARGETS, LSE, LOSS, PARTS, DA, n_a, n_b, d,
                     stride_a, stride_ad, stride_b, stride_bd, scale, shift, split_columns, n_key,
                     FIXED_SHIFT: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                     CHUNKS: tl.constexpr, PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """``_lse_kernel``'s LSE and LOSS (stored by the programs of the first D span) and, for this
    program's span of D (CHUNKS accumulators of BLOCK_DO columns, 1 to 3), DA[a] = ∂(Σ_a LOSS[a])/∂Â_a
    = scale · (Σ_{b≠t} p_ab inv_b B_b + expm1(−LOSS[a]) inv_t B_t), with t = TARGETS[a] and p the
    row's softmax: p_t − 1 = expm1(−ℓ), exact where p_t rounds to 1.

    FIXED_SHIFT (every z ≤ ``shift``, as normalized rows give with shift = |scale|): the sums are
    taken as Σ e^{z − shift}, so no tile computes a row max and no accumulator is rescaled (a
    multiply of every accumulator element per column tile otherwise).

    Program (i, j, s) streams the s-th ``split_columns`` columns. With SPLIT it stores its split's
    statistics (``_lse_kernel``'s PARTS, from the first span) and its accumulators as they are,
    DA[s, a, span] = Σ_{b≠t in the split} e^{z_ab − its max} inv_b B_b, which ``_row_lse_grad``
    merges and finishes (the division by the total, the target's term) in the launcher."""
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    b_start, b_end = _split_columns(n_b, split_columns, 2, SPLIT)
    span = tl.program_id(1) * (CHUNKS * BLOCK_DO)
    offs_do0 = span + tl.arange(0, BLOCK_DO)
    mask_a = offs_a < n_a
    inv_a = tl.load(INV_A + offs_a, mask=mask_a, other=0.0)
    target = tl.load(TARGETS + offs_a, mask=mask_a, other=-1)
    row_max = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    row_other = tl.zeros((BLOCK_A,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_A,), dtype=tl.float32)
    # Σ_{b≠t} e^{z_ab − row_max} inv_b B_b, chunk by chunk (the ones past CHUNKS stay unused).
    acc0 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    if FIXED_SHIFT:
        row_max = tl.full((BLOCK_A,), shift, dtype=tl.float32)
    for b0 in range(b_start, b_end, BLOCK_B):
        offs_b, mask_b, inv_b, z = column_tile(A, B, INV_B, offs_a, mask_a, inv_a, b0, b_end, d, stride_a, stride_ad,
                                               stride_b, stride_bd, scale, BLOCK_A, BLOCK_B, BLOCK_D, PRECISION,
                                               INT64_OFFSETS)
        z = tl.where(mask_b[None, :], z, float("-inf"))
        is_target = offs_b[None, :] == target[:, None]
        if SPLIT:  # a tile may reach past its split's end into the next split, where the target may lie
            is_target = is_target & mask_b[None, :]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if FIXED_SHIFT:
            others = tl.where(is_target, 0.0, tl.exp(z - shift))
            row_other += tl.sum(others, axis=1)
        else:
            new_max = tl.maximum(row_max, tl.max(z, axis=1))
            rescale = tl.exp(row_max - new_max)
            others = tl.where(is_target, 0.0, tl.exp(z - new_max[:, None]))
            row_other = row_other * rescale + tl.sum(others, axis=1)
            row_max = new_max
            r = rescale[:, None]
            acc0, acc1, acc2 = acc0 * r, acc1 * r, acc2 * r
        acc0, acc1, acc2 = accumulate_chunks(acc0, acc1, acc2, others * inv_b[None, :], B, offs_b, mask_b,
                                             offs_do0, d, stride_b, stride_bd, BLOCK_DO, CHUNKS, PRECISION,
                                             INT64_OFFSETS)
    if SPLIT:
        _store_split_grad(PARTS, DA, row_max, row_other, target_logit, acc0, acc1, acc2, offs_a, mask_a, offs_do0,
                          n_a, d, BLOCK_DO, CHUNKS, INT64_OFFSETS)
    else:
        _store_rows_grad(B, INV_B, LSE, LOSS, DA, row_max, row_other, target_logit, target, acc0, acc1, acc2, offs_a,
                         mask_a, offs_do0, n_b, d, stride_b, stride_bd, scale, BLOCK_DO, CHUNKS, INT64_OFFSETS)


@triton.jit
def _store_split_grad(PARTS, DA, row_max, row_other, target_logit, acc0, acc1, acc2, offs_a, mask_a, offs_do0, n_a, d,
                      BLOCK_DO: tl.constexpr, CHUNKS: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """A SPLIT ``_lse_grad_kernel`` program's output: its split's statistics (first span only) into
    PARTS (3, splits, n_a) and its accumulators into DA (splits, n_a, d), program axes (i, j, s)."""
    split = tl.program_id(2)
    if tl.program_id(1) == 0:
        _store_split_statistics(PARTS, split, tl.num_programs(2), row_max, row_other, target_logit, offs_a, mask_a,
                                n_a, INT64_OFFSETS)
    store_chunks(DA + as_index(split, INT64_OFFSETS) * n_a * d, acc0, acc1, acc2, offs_a, mask_a, offs_do0, d,
                 BLOCK_DO, CHUNKS, INT64_OFFSETS)


@triton.jit
def _store_rows_grad(B, INV_B, LSE, LOSS, DA, row_max, row_other, target_logit, target, acc0, acc1, acc2, offs_a,
                     mask_a, offs_do0, n_b, d, stride_b, stride_bd, scale, BLOCK_DO: tl.constexpr,
                     CHUNKS: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """A one-split ``_lse_grad_kernel`` program's output: LSE and LOSS (first span only) and its
    span of DA = scale · (acc / total + expm1(−loss) inv_t B_t)."""
    offs_do1 = offs_do0 + BLOCK_DO
    offs_do2 = offs_do1 + BLOCK_DO
    shifted_target = target_logit - row_max
    target_weight = tl.exp(shifted_target)
    total = target_weight + row_other
    # A target outside [0, n_b) (a direct call of the op; the public losses check theirs) gives its row
    # a NaN loss and gradient, and no read outside B: the reads below take row 0 instead.
    has_target = (target >= 0) & (target < n_b)
    loss = tl.where(has_target, _loss_from_weights(target_weight, row_other, shifted_target), float("nan"))
    target = tl.where(has_target, target, 0)
    first_span = tl.program_id(1) == 0
    tl.store(LSE + offs_a, row_max + tl.log(total), mask=mask_a & first_span)
    tl.store(LOSS + offs_a, loss, mask=mask_a & first_span)
    target_coef = _expm1(-loss) * tl.load(INV_B + target, mask=mask_a, other=0.0)
    _store_grad_chunk(DA, acc0, total, target_coef, B, target, offs_a, mask_a, offs_do0, d, stride_b, stride_bd, scale,
                      INT64_OFFSETS)
    if CHUNKS > 1:
        _store_grad_chunk(DA, acc1, total, target_coef, B, target, offs_a, mask_a, offs_do1, d, stride_b, stride_bd,
                          scale, INT64_OFFSETS)
    if CHUNKS > 2:
        _store_grad_chunk(DA, acc2, total, target_coef, B, target, offs_a, mask_a, offs_do2, d, stride_b, stride_bd,
                          scale, INT64_OFFSETS)


@autotuned(_GRAD_HALF, _GRAD_FLOAT32, triton.Config(dict(_INTERPRETER, BLOCK_DO=64, CHUNKS=2)), _KEY, "A")
@triton.jit
def _grad_kernel(A, B, INV_A, INV_B, LSE_A, G_A, T_A, TG_A, LSE_B, G_B, T_B, TG_B, DA, n_a, n_b, d,
                 stride_a, stride_ad, stride_b, stride_bd, scale, split_columns, n_key,
                 HAS_A_TERM: tl.constexpr, HAS_B_TERM: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                 CHUNKS: tl.constexpr, PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """DA[a, this program's span of D (CHUNKS chunks of BLOCK_DO)] = scale · Σ_b dz_ab · inv_b[b] · B_b, with
    dz_ab = G_A[a] (exp(z_ab − LSE_A[a]) − [b = T_A[a]]) + G_B[b] (exp(z_ab − LSE_B[b]) − [a = T_B[b]]),
    where a target's term is TG_A[a] (TG_B[b]) = G·expm1(−ℓ) instead.

    With SPLIT, program (i, j, s) sums over the s-th ``split_columns`` columns into DA[s] (DA being
    (splits, n_a, d)), whose sum over s the launcher takes."""
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_do0 = tl.program_id(1) * (CHUNKS * BLOCK_DO) + tl.arange(0, BLOCK_DO)
    b_start, b_end = _split_columns(n_b, split_columns, 2, SPLIT)
    mask_a = offs_a < n_a
    inv_a = tl.load(INV_A + offs_a, mask=mask_a, other=0.0)
    if HAS_A_TERM:
        lse_a = tl.load(LSE_A + offs_a, mask=mask_a, other=0.0)
        g_a = tl.load(G_A + offs_a, mask=mask_a, other=0.0)
        t_a = tl.load(T_A + offs_a, mask=mask_a, other=-1)
        tg_a = tl.load(TG_A + offs_a, mask=mask_a, other=0.0)
    acc0 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    for b0 in range(b_start, b_end, BLOCK_B):
        offs_b, mask_b, inv_b, z = column_tile(A, B, INV_B, offs_a, mask_a, inv_a, b0, b_end, d, stride_a, stride_ad,
                                               stride_b, stride_bd, scale, BLOCK_A, BLOCK_B, BLOCK_D, PRECISION,
                                               INT64_OFFSETS)
        dz = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        if HAS_A_TERM:
            hit = offs_b[None, :] == t_a[:, None]
            dz += tl.where(hit, tg_a[:, None], g_a[:, None] * tl.exp(z - lse_a[:, None]))
        if HAS_B_TERM:
            lse_b = tl.load(LSE_B + offs_b, mask=mask_b, other=0.0)
            g_b = tl.load(G_B + offs_b, mask=mask_b, other=0.0)
            t_b = tl.load(T_B + offs_b, mask=mask_b, other=-1)
            tg_b = tl.load(TG_B + offs_b, mask=mask_b, other=0.0)
            hit = offs_a[:, None] == t_b[None, :]
            dz += tl.where(hit, tg_b[None, :], g_b[None, :] * tl.exp(z - lse_b[None, :]))
        dz = tl.where(mask_a[:, None] & mask_b[None, :], dz * (inv_b * scale)[None, :], 0.0)
        acc0, acc1, acc2 = accumulate_chunks(acc0, acc1, acc2, dz, B, offs_b, mask_b, offs_do0, d, stride_b, stride_bd,
                                             BLOCK_DO, CHUNKS, PRECISION, INT64_OFFSETS)
    if SPLIT:
        DA += as_index(tl.program_id(2), INT64_OFFSETS) * n_a * d
    store_chunks(DA, acc0, acc1, acc2, offs_a, mask_a, offs_do0, d, BLOCK_DO, CHUNKS, INT64_OFFSETS)


# --------------------------------------------------------------------------------------------------
# Launchers: grids, inverse norms, the normalization epilogue. No autograd here.
# --------------------------------------------------------------------------------------------------


def _strides(a, b):
    return a.stride(0), a.stride(1), b.stride(0), b.stride(1)


def _row_lse(a, b, inv_a, inv_b, targets, scale, columns_shift=None):
    """(lse (n_a,), loss (n_a,)) of z = scale·Â B̂ᵀ read by rows of A; with ``columns_shift`` (an
    upper bound of z) also (col_other, col_target) of ``_lse_kernel``'s COLUMNS, else Nones."""
    n_a, d = a.shape
    n_b = b.shape[0]
    split_columns, splits = column_split(n_b, n_a, a.device, half=a.dtype != torch.float32)
    lse = torch.empty(n_a, device=a.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    columns = columns_shift is not None
    # Buffers a kernel variant never reads: lse stands in (a real pointer, unlike an empty tensor's).
    parts = torch.empty(3, splits, n_a, device=a.device, dtype=torch.float32) if splits > 1 else lse
    col_other = torch.zeros(n_b, device=a.device, dtype=torch.float32) if columns else lse
    col_target = torch.empty_like(col_other) if columns else lse
    grid = lambda meta: (triton.cdiv(n_a, meta["BLOCK_A"]), splits)  # noqa: E731
    _lse_kernel[grid](a, b, inv_a, inv_b, targets, lse, loss, parts, col_other, col_target, n_a, n_b, d,
                      *_strides(a, b), scale, float(columns_shift or 0.0), split_columns, size_key(split_columns),
                      COLUMNS=columns, SPLIT=splits > 1, PRECISION=precision(a),
                      INT64_OFFSETS=needs_int64_offsets(a, b, parts))
    if splits > 1:
        lse, loss, _, _ = _merged_rows(parts, targets, n_b)
    return lse, loss, (col_other if columns else None), (col_target if columns else None)


def _row_lse_grad(a, b, inv_a, inv_b, targets, scale, shift=None):
    """(lse, loss, dÂ (n_a, D) float32 of Σ loss) in one pass over z = scale·Â B̂ᵀ by rows of A;
    with ``shift`` (an upper bound of z) under that fixed shift instead of a running max."""
    n_a, d = a.shape
    n_b = b.shape[0]
    split_columns, splits = column_split(n_b, n_a, a.device, d, half=a.dtype != torch.float32)
    lse = torch.empty(n_a, device=a.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    da = torch.empty(splits, n_a, d, device=a.device, dtype=torch.float32)
    parts = torch.empty(3, splits, n_a, device=a.device, dtype=torch.float32) if splits > 1 else lse
    _lse_grad_kernel[span_grid(n_a, d, splits)](
        a, b, inv_a, inv_b, targets, lse, loss, parts, da, n_a, n_b, d, *_strides(a, b), scale, float(shift or 0.0),
        split_columns, size_key(split_columns), FIXED_SHIFT=shift is not None, SPLIT=splits > 1,
        PRECISION=precision(a), INT64_OFFSETS=needs_int64_offsets(a, b, da, parts))
    if splits == 1:
        return lse, loss, da[0]
    lse, loss, weights, total = _merged_rows(parts, targets, n_b)
    # dÂ = scale · (Σ_s e^{max_s − max} acc_s / total + expm1(−loss) inv_t B̂_t), as _store_rows_grad;
    # elementwise in float32 (a matmul could take TF32 where the user allows it).
    acc = da.mul_(weights.unsqueeze(-1)).sum(0)
    target = torch.where((targets >= 0) & (targets < n_b), targets, 0)
    target_coef = torch.expm1(-loss) * inv_b[target]
    return lse, loss, (acc / total.unsqueeze(-1) + target_coef.unsqueeze(-1) * b[target].float()) * scale


def _merged_rows(parts, targets, n_b):
    """(lse, loss, weights (splits, n_a), total) of rows whose columns were split, from each split's
    (max, Σ_{b≠t} e^{z_ab − max}, z_at or 0) in ``parts`` (3, splits, n_a): weights = e^{max_s − max}
    rescale a split's sums to the row's max, total = Σ_b e^{z_ab − max}. A target outside [0, n_b)
    gives NaN, as in the kernels."""
    part_max, part_other, part_target = parts.unbind(0)
    row_max = part_max.amax(0)
    weights = torch.exp(part_max - row_max)
    lse, loss, total = _lse_and_loss(row_max, (part_other * weights).sum(0), part_target.sum(0))
    loss = torch.where((targets >= 0) & (targets < n_b), loss, float("nan"))
    return lse, loss, weights, total


def _grad_rows(a, b, inv_a, inv_b, a_term, b_term, scale):
    """dÂ (n_a, D) float32 for the rows of A; a_term / b_term = (lse, g, targets, g·expm1(−loss))
    or None."""
    n_a, d = a.shape
    n_b = b.shape[0]
    split_columns, splits = column_split(n_b, n_a, a.device, d, half=a.dtype != torch.float32)
    da = torch.empty(splits, n_a, d, device=a.device, dtype=torch.float32)
    dummy = inv_a  # never read when its term is off (constexpr)
    lse_a, g_a, t_a, tg_a = a_term if a_term is not None else (dummy,) * 4
    lse_b, g_b, t_b, tg_b = b_term if b_term is not None else (dummy,) * 4
    _grad_kernel[span_grid(n_a, d, splits)](
        a, b, inv_a, inv_b, lse_a, g_a, t_a, tg_a, lse_b, g_b, t_b, tg_b, da, n_a, n_b, d, *_strides(a, b), scale,
        split_columns, size_key(split_columns), HAS_A_TERM=a_term is not None, HAS_B_TERM=b_term is not None,
        SPLIT=splits > 1, PRECISION=precision(a), INT64_OFFSETS=needs_int64_offsets(a, b, da))
    return da[0] if splits == 1 else da.sum(0)


# Below this, e^{−2|scale|} (the smallest term under the fixed shift) is a normal float32 with
# room for N terms: the one-pass column statistics and the fixed-shift gradient pass keep full
# precision.
_ONE_PASS_MAX_SCALE = 40.0


def _lse_and_loss(row_max, other, target_logit):
    """(lse, loss, total) from a row's max, Σ_{b≠t} e^{z_b − max} and z_t, in the kernels' log1p form
    (the target's weight against the others'); total = Σ_b e^{z_b − max}."""
    shifted_target = target_logit - row_max
    target_weight = torch.exp(shifted_target)
    total = target_weight + other
    dominant = target_weight >= other
    loss = torch.where(dominant, torch.log1p(other / torch.where(dominant, target_weight, 1.0)),
                       torch.log(total) - shifted_target)
    return row_max + torch.log(total), loss, total


def contrastive_forward(q, k, targets, scale: float, normalize: bool, symmetric: bool):
    """As chunked.contrastive_forward: (row_loss, col_loss, row_lse, col_lse), float32. The
    symmetric loss gets its column statistics from the rows' own pass where z is bounded by
    |scale| (normalized rows, |scale| ≤ 40) and results need not be bitwise reproducible (their
    sums are atomic adds in varying order: ``torch.use_deterministic_algorithms`` turns this off);
    otherwise from a second pass over z by columns."""
    q, k = common_dtype(q, k)
    targets = targets.contiguous()  # the kernels index it as one row of int64s
    inv_q, inv_k = inverse_norms(q, normalize), inverse_norms(k, normalize)
    one_pass = (symmetric and normalize and abs(scale) <= _ONE_PASS_MAX_SCALE
                and not torch.are_deterministic_algorithms_enabled())
    shift = abs(scale) if one_pass else None
    row_lse, row_loss, col_other, col_target = _row_lse(q, k, inv_q, inv_k, targets, scale, shift)
    if not symmetric:
        return row_loss, row_lse.new_empty(0), row_lse, row_lse.new_empty(0)
    if one_pass:
        col_lse, col_loss, _ = _lse_and_loss(shift, col_other, col_target)
    else:
        own = torch.arange(k.shape[0], device=q.device)
        col_lse, col_loss, _, _ = _row_lse(k, q, inv_k, inv_q, own, scale)
    return row_loss, col_loss, row_lse, col_lse


def _term(lse, grad, targets, loss):
    """A direction's arguments of ``_grad_kernel``: p − 1 at a target is expm1(−ℓ), exact where
    p = e^{−ℓ} rounds to 1."""
    grad = grad.float().contiguous()
    return lse.float().contiguous(), grad, targets.contiguous(), (grad * torch.expm1(-loss.float())).contiguous()


def contrastive_backward(grad_row, grad_col, q, k, targets, row_lse, col_lse, row_loss, col_loss,
                         scale: float, normalize: bool, symmetric: bool, need_q: bool, need_k: bool):
    """As chunked.contrastive_backward: (dq, dk) in the inputs' dtypes, (0,) where not needed."""
    q_dtype, k_dtype = q.dtype, k.dtype
    q, k = common_dtype(q, k)
    inv_q, inv_k = inverse_norms(q, normalize), inverse_norms(k, normalize)
    row_term = _term(row_lse, grad_row, targets, row_loss)
    col_term = _term(col_lse, grad_col, torch.arange(k.shape[0], device=q.device), col_loss) if symmetric else None
    dq = dk = None
    if need_q:
        dq = input_grad(_grad_rows(q, k, inv_q, inv_k, row_term, col_term, scale), q, normalize)
    if need_k:
        dk = input_grad(_grad_rows(k, q, inv_k, inv_q, col_term, row_term, scale), k, normalize)
    dq = dq.to(q_dtype) if need_q else q.new_empty(0, dtype=q_dtype)
    dk = dk.to(k_dtype) if need_k else k.new_empty(0, dtype=k_dtype)
    return dq, dk


def contrastive_forward_with_grad(q, k, targets, scale: float, normalize: bool, need_q: bool, need_k: bool):
    """As chunked.contrastive_forward_with_grad: (loss_sum (), dq, dk) in float32. dq comes from the
    statistics' own pass; dk, a sum over rows that needs every row's final statistics, from a
    second pass."""
    q, k = common_dtype(q, k)
    targets = targets.contiguous()  # the kernels index it as one row of int64s
    inv_q, inv_k = inverse_norms(q, normalize), inverse_norms(k, normalize)
    dq, dk = q.new_empty(0, dtype=torch.float32), k.new_empty(0, dtype=torch.float32)
    if need_q:
        # A fixed shift where z is bounded (normalized rows): p down to e^{−2|scale|} enters the
        # dots in a dtype with float32's range (float16's in TF32: tiles.accumulate_chunk).
        fixed = normalize and abs(scale) <= _ONE_PASS_MAX_SCALE
        row_lse, row_loss, dq_hat = _row_lse_grad(q, k, inv_q, inv_k, targets, scale, abs(scale) if fixed else None)
        dq = input_grad(dq_hat, q, normalize)
    else:
        row_lse, row_loss, _, _ = _row_lse(q, k, inv_q, inv_k, targets, scale)
    if need_k:
        row_term = _term(row_lse, torch.ones_like(row_lse), targets, row_loss)
        dk = input_grad(_grad_rows(k, q, inv_k, inv_q, None, row_term, scale), k, normalize)
    return row_loss.sum(), dq, dk
