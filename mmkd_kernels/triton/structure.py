"""Fused Triton kernels of the structure loss, tile algorithm (DESIGN §1.2).

Both similarity matrices, G^S = ŝŝᵀ and G^T = t̂t̂ᵀ, are computed tile by tile in the same pass and
never stored; the diagonal (i, i) is masked out. Kinds are a constexpr: 0 mse, 1 pearson, 2 kl.

- ``_rows_kernel``: for a block of rows, one pass over the column tiles with per-row statistics in
  registers: mse the sum of squared differences; pearson means, sums of squares and cross-sums
  merged tile by tile with Chan's parallel formulas (each tile centered on its own mean: no
  Σw² − (Σw)²/n cancellation); kl, for cosine similarities at |scale| ≤ KL_CENTRED_MAX_SCALE,
  its centred form (below), else two online softmaxes and the running Σ P·(a − b). Writes the
  per-row losses and the statistics the gradient needs.
- The centred kl: with p the teacher's softmax over j ≠ i (a = scale·G^T), d = b − a the logits'
  difference (b = scale·G^S) and μ = Σ p d, KL_i = log Σ p e^{d − μ} = log1p(V / Z) for
  Z = Σ w and V = Σ w φ(d − μ), w = e^{a − |scale|} and φ(x) = e^x − 1 − x ≥ 0: a sum of terms
  ≥ 0, where Σ p log(p/q) adds terms far larger than a small KL (a student close to its teacher).
  μ is not known until the row ends, so each tile's (Z, μ, V) is taken about its own mean and
  merged into the running ones as Chan et al. merge variances: about the merged mean μ', a part
  with mean μ₁ has V₁' = e^{μ₁ − μ'} V₁ + Z₁ φ(μ₁ − μ'), again terms ≥ 0. One pass, as before.
- ``_grad_kernel``: recomputes the tiles and turns the per-row statistics into dG (of one side:
  student or teacher). G = x̂x̂ᵀ sends dG_ij to x̂_i and to x̂_j; since G is symmetric, one tile of
  rows j × columns i gives both terms of row j (its own statistics' dG_ji, and read transposed,
  the columns' dG_ij), so each program accumulates its rows' whole gradient with each tile
  computed once and without atomics.

The gram algorithm needs no custom kernel on a GPU: its D×D products are cuBLAS matmuls
(``chunked.structure_gram_*``).
"""

import torch
import triton
import triton.language as tl

from .. import chunked
from .tiles import (accumulate_chunks, autotuned, common_dtype, configs, input_grad, inverse_norms, needs_int64_offsets,
                    precision, similarity_tile, size_key, span_grid, store_chunks)

KIND_CODES = {"mse": 0, "pearson": 1, "kl": 2}
N_STATS = 5  # per-row statistics saved for the gradient (see _rows_kernel)
# 1e-8 in the kernels is reference.EPS: the pearson denominator is max(√var_s·√var_t, eps), each root
# first, since var_s·var_t overflows float32 for variances past 1.8e19 (unnormalized rows of 3e4).

# Configs for an H100 (block sizes, warps, stages); no half-precision one spills registers there
# (benchmarks/triton_sm90.py, results/triton-sm90-*.md); every kernel holds two similarity tiles
# at once, so the tiles are smaller than the contrastive kernels'.
_ROWS = ("BLOCK_A", "BLOCK_B", "BLOCK_D")
_GRAD = _ROWS + ("BLOCK_DO", "CHUNKS")
_ROWS_HALF = configs([(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 32, 4, 4)], _ROWS)
_ROWS_FLOAT32 = configs([(64, 64, 32, 8, 2), (64, 64, 16, 4, 2), (64, 64, 16, 8, 2)], _ROWS)
# The gradient kernel: up to three 128-wide accumulators keep D = 384 in one program (the two tiles
# computed once) and D = 768 in two; it holds a tile's row and column dG at once, hence 32-wide
# column steps with three chunks.
_GRAD_HALF = configs([(64, 32, 64, 128, 3, 8, 2), (64, 32, 32, 128, 3, 8, 3), (64, 32, 64, 128, 2, 8, 2),
                      (64, 64, 64, 128, 1, 8, 2), (64, 64, 64, 64, 1, 8, 2)], _GRAD)
_GRAD_FLOAT32 = configs([(64, 64, 16, 128, 1, 8, 2), (64, 64, 32, 64, 1, 8, 2), (32, 32, 16, 64, 1, 4, 2)], _GRAD)
_INTERPRETER = dict(BLOCK_A=64, BLOCK_B=64, BLOCK_D=64)
# Tuned per widths, octave of N, dtype (Triton adds it) and variant (kind, form, side): each does
# other work per tile. Each kernel is keyed on the names it has (tiles.autotuned).
_KEY = ["ds", "dt", "n_key", "KIND", "CENTRED", "SIDE"]


@triton.jit
def _expm1_minus_x(x):
    """φ(x) = e^x − 1 − x, float32, to a few ulps of φ: its Taylor series Σ_{k=2..10} x^k/k! where
    |x| < 1/2 (there e^x − 1 − x would cancel to eps/x² of the result), e^x − 1 − x elsewhere.
    As csrc/cpu/common.h's expm1_minus_x."""
    small = tl.abs(x) < 0.5
    t = tl.where(small, x, 0.0)
    series = 1.0 / 3628800.0
    series = series * t + 1.0 / 362880.0
    series = series * t + 1.0 / 40320.0
    series = series * t + 1.0 / 5040.0
    series = series * t + 1.0 / 720.0
    series = series * t + 1.0 / 120.0
    series = series * t + 1.0 / 24.0
    series = series * t + 1.0 / 6.0
    series = series * t + 0.5
    return tl.where(small, t * t * series, (tl.exp(x) - 1.0) - x)


@triton.jit
def _log1p(u):
    """log(1 + u) for u ≥ 0 to a few ulps: 2·atanh(v), v = u/(2 + u) ≤ 1/3, by its series where
    u ≤ 1 (log(1 + u) would lose the digits of a small u, and a GPU's fast log is accurate to an
    absolute 2^-22 only), log(1 + u) above."""
    v = u / (2.0 + u)
    v2 = v * v
    series = 1.0 / 17.0
    series = series * v2 + 1.0 / 15.0
    series = series * v2 + 1.0 / 13.0
    series = series * v2 + 1.0 / 11.0
    series = series * v2 + 1.0 / 9.0
    series = series * v2 + 1.0 / 7.0
    series = series * v2 + 1.0 / 5.0
    series = series * v2 + 1.0 / 3.0
    series = series * v2 + 1.0
    return tl.where(u <= 1.0, 2.0 * v * series, tl.log(1.0 + u))


@triton.jit
def _both_tiles(S, T, INV_S, INV_T, offs_a, offs_b, mask_a, mask_b, ds, dt, s_row, s_col, t_row, t_col,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                INT64_OFFSETS: tl.constexpr):
    """Tiles of G^S and G^T for rows offs_a and columns offs_b, and the mask of pairs i ≠ j that exist."""
    inv_sa = tl.load(INV_S + offs_a, mask=mask_a, other=0.0)
    inv_sb = tl.load(INV_S + offs_b, mask=mask_b, other=0.0)
    inv_ta = tl.load(INV_T + offs_a, mask=mask_a, other=0.0)
    inv_tb = tl.load(INV_T + offs_b, mask=mask_b, other=0.0)
    gs = similarity_tile(S, S, offs_a, offs_b, mask_a, mask_b, ds, s_row, s_col, s_row, s_col,
                         inv_sa, inv_sb, 1.0, BLOCK_A, BLOCK_B, BLOCK_D, PRECISION, INT64_OFFSETS)
    gt = similarity_tile(T, T, offs_a, offs_b, mask_a, mask_b, dt, t_row, t_col, t_row, t_col,
                         inv_ta, inv_tb, 1.0, BLOCK_A, BLOCK_B, BLOCK_D, PRECISION, INT64_OFFSETS)
    valid = mask_a[:, None] & mask_b[None, :] & (offs_a[:, None] != offs_b[None, :])
    return gs, gt, valid


@autotuned(_ROWS_HALF, _ROWS_FLOAT32, triton.Config(_INTERPRETER), _KEY, "S")
@triton.jit
def _rows_kernel(S, T, INV_S, INV_T, LOSS, STATS, n, row_start, row_count, ds, dt,
                 s_row, s_col, t_row, t_col, scale, n_key,
                 KIND: tl.constexpr, CENTRED: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """Per-row losses LOSS[i − row_start] and STATS[i − row_start, :5]: pearson (mean_s, mean_t,
    var_s, var_t, cov), kl (lse_t, μ, kl, 0, 0) when CENTRED, else (lse_t, lse_s, kl, 0, 0), mse zeros."""
    local = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = local < row_count
    offs_a = row_start + local
    minus_inf = float("-inf")
    # Running statistics; their meaning depends on KIND (see the stores below).
    count = tl.zeros((BLOCK_A,), dtype=tl.float32)
    r0 = tl.zeros((BLOCK_A,), dtype=tl.float32)
    r1 = tl.zeros((BLOCK_A,), dtype=tl.float32)
    r2 = tl.zeros((BLOCK_A,), dtype=tl.float32)
    r3 = tl.zeros((BLOCK_A,), dtype=tl.float32)
    r4 = tl.zeros((BLOCK_A,), dtype=tl.float32)
    max_a = tl.full((BLOCK_A,), minus_inf, dtype=tl.float32)
    max_b = tl.full((BLOCK_A,), minus_inf, dtype=tl.float32)
    for b0 in range(0, n, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < n
        gs, gt, valid = _both_tiles(S, T, INV_S, INV_T, offs_a, offs_b, mask_a, mask_b, ds, dt,
                                    s_row, s_col, t_row, t_col, BLOCK_A, BLOCK_B, BLOCK_D, PRECISION, INT64_OFFSETS)
        if KIND == 0:
            diff = tl.where(valid, gs - gt, 0.0)
            r0 += tl.sum(diff * diff, axis=1)
        elif KIND == 1:
            # r0 mean_s, r1 mean_t, r2 M2_s, r3 M2_t, r4 C: Chan et al.'s merge of this tile's
            # statistics (centered on the tile's own means) into the running ones.
            tile_count = tl.sum(valid.to(tl.float32), axis=1)
            safe = tl.maximum(tile_count, 1.0)
            tile_mean_s = tl.sum(tl.where(valid, gs, 0.0), axis=1) / safe
            tile_mean_t = tl.sum(tl.where(valid, gt, 0.0), axis=1) / safe
            cs = tl.where(valid, gs - tile_mean_s[:, None], 0.0)
            ct = tl.where(valid, gt - tile_mean_t[:, None], 0.0)
            total = count + tile_count
            weight = tl.where(total > 0, tile_count / tl.maximum(total, 1.0), 0.0)
            delta_s = tile_mean_s - r0
            delta_t = tile_mean_t - r1
            r0 += delta_s * weight
            r1 += delta_t * weight
            r2 += tl.sum(cs * cs, axis=1) + delta_s * delta_s * count * weight
            r3 += tl.sum(ct * ct, axis=1) + delta_t * delta_t * count * weight
            r4 += tl.sum(cs * ct, axis=1) + delta_s * delta_t * count * weight
            count = total
        elif CENTRED:
            # r0 Z, r1 μ, r2 V (module docstring). |a| ≤ |scale|, so w = e^{a − |scale|} needs no
            # running max; |d − μ| ≤ 4|scale| keeps every e^x finite.
            shift = tl.abs(scale)
            d = tl.where(valid, (gs - gt) * scale, 0.0)
            w = tl.where(valid, tl.exp(gt * scale - shift), 0.0)
            tile_z = tl.sum(w, axis=1)
            # The mean about the tile's largest d: exact when the row has one column (N = 2, whose
            # loss is then exactly 0), where Σ w d / Σ w would round.
            pivot = tl.max(tl.where(valid, d, minus_inf), axis=1)
            pivot = tl.where(pivot == minus_inf, 0.0, pivot)
            tile_mu = pivot + tl.sum(w * (d - pivot[:, None]), axis=1) / tl.where(tile_z > 0, tile_z, 1.0)
            tile_v = tl.sum(tl.where(valid, w * _expm1_minus_x(d - tile_mu[:, None]), 0.0), axis=1)
            total = r0 + tile_z
            mu = r1 + (tile_mu - r1) * (tile_z / tl.where(total > 0, total, 1.0))
            old_part = r1 - mu
            tile_part = tile_mu - mu
            r2 = (tl.exp(old_part) * r2 + r0 * _expm1_minus_x(old_part)
                  + tl.exp(tile_part) * tile_v + tile_z * _expm1_minus_x(tile_part))
            r0 = total
            r1 = mu
        else:
            # a = G^T/τ (teacher, P), b = G^S/τ (student, Q). r0 Σexp(a − max_a), r1 Σexp(b − max_b),
            # r2 Σexp(a − max_a)(a − b): KL_i = r2/r0 − lse_a + lse_b.
            a = tl.where(valid, gt * scale, minus_inf)
            b = tl.where(valid, gs * scale, minus_inf)
            new_a = tl.maximum(max_a, tl.max(a, axis=1))
            new_b = tl.maximum(max_b, tl.max(b, axis=1))
            safe_a = tl.where(new_a == minus_inf, 0.0, new_a)
            safe_b = tl.where(new_b == minus_inf, 0.0, new_b)
            alpha = tl.exp(max_a - safe_a)
            e = tl.exp(a - safe_a[:, None])
            r0 = r0 * alpha + tl.sum(e, axis=1)
            r2 = r2 * alpha + tl.sum(tl.where(valid, e * (a - b), 0.0), axis=1)
            r1 = r1 * tl.exp(max_b - safe_b) + tl.sum(tl.exp(b - safe_b[:, None]), axis=1)
            max_a = new_a
            max_b = new_b
    if KIND == 0:
        loss = r0 / (n - 1)
        zero = tl.zeros_like(r0)
        s0, s1, s2, s3, s4 = zero, zero, zero, zero, zero
    elif KIND == 1:
        loss = 1.0 - r4 / tl.maximum(tl.sqrt(r2) * tl.sqrt(r3), 1e-8)
        s0, s1, s2, s3, s4 = r0, r1, r2, r3, r4
    elif CENTRED:
        loss = _log1p(r2 / r0)
        s0, s1, s2, s3, s4 = tl.abs(scale) + tl.log(r0), r1, loss, tl.zeros_like(r0), tl.zeros_like(r0)
    else:
        lse_a = max_a + tl.log(r0)
        lse_b = max_b + tl.log(r1)
        # Differences first: with one column, (a − b) − ((max_a − max_b) + 0) is exactly 0.
        loss = r2 / r0 - ((max_a - max_b) + (tl.log(r0) - tl.log(r1)))
        s0, s1, s2, s3, s4 = lse_a, lse_b, loss, tl.zeros_like(r0), tl.zeros_like(r0)
    tl.store(LOSS + local, loss, mask=mask_a)
    base = STATS + local * 5
    tl.store(base + 0, s0, mask=mask_a)
    tl.store(base + 1, s1, mask=mask_a)
    tl.store(base + 2, s2, mask=mask_a)
    tl.store(base + 3, s3, mask=mask_a)
    tl.store(base + 4, s4, mask=mask_a)


@triton.jit
def _d_from_tiles(gs, gt, valid, STATS, G, offs_a, mask_a, n, row_start, scale,
                  KIND: tl.constexpr, CENTRED: tl.constexpr, SIDE: tl.constexpr):
    """dG of one side (SIDE 0: G^S, 1: G^T) on a tile whose rows offs_a are computed rows
    (mask_a) and whose similarity tiles gs, gt are given; zero off ``valid``. The rows'
    statistics come from STATS, their gradient weights from G."""
    base = STATS + (offs_a - row_start) * 5
    g = tl.load(G + offs_a - row_start, mask=mask_a, other=0.0)
    if KIND == 0:
        dg = tl.where(valid, (gs - gt) * (2.0 * g / (n - 1))[:, None], 0.0)
        if SIDE == 1:
            dg = -dg
    elif KIND == 1:
        mean_s = tl.load(base + 0, mask=mask_a, other=0.0)
        mean_t = tl.load(base + 1, mask=mask_a, other=0.0)
        var_s = tl.load(base + 2, mask=mask_a, other=1.0)
        var_t = tl.load(base + 3, mask=mask_a, other=1.0)
        cov = tl.load(base + 4, mask=mask_a, other=0.0)
        root = tl.sqrt(var_s) * tl.sqrt(var_t)
        denom = tl.maximum(root, 1e-8)
        r = cov / denom
        g_r = -g  # loss_i = 1 − r_i
        unclamped = root > 1e-8
        cs = tl.where(valid, gs - mean_s[:, None], 0.0)
        ct = tl.where(valid, gt - mean_t[:, None], 0.0)
        if SIDE == 0:
            coef = tl.where(unclamped, g_r * r / tl.where(unclamped, var_s, 1.0), 0.0)
            dg = ct * (g_r / denom)[:, None] - cs * coef[:, None]
        else:
            coef = tl.where(unclamped, g_r * r / tl.where(unclamped, var_t, 1.0), 0.0)
            dg = cs * (g_r / denom)[:, None] - ct * coef[:, None]
    elif CENTRED:
        # q − p = p (e^{x − kl} − 1) and ∂kl/∂a = −p x for x = d − μ: no difference of near numbers.
        lse_a = tl.load(base + 0, mask=mask_a, other=0.0)
        mu = tl.load(base + 1, mask=mask_a, other=0.0)
        kl = tl.load(base + 2, mask=mask_a, other=0.0)
        p = tl.where(valid, tl.exp(gt * scale - lse_a[:, None]), 0.0)
        x = tl.where(valid, (gs - gt) * scale - mu[:, None], 0.0)
        if SIDE == 0:
            u = x - kl[:, None]
            dg = p * (u + _expm1_minus_x(u)) * (g * scale)[:, None]
        else:
            dg = -(p * x) * (g * scale)[:, None]
    else:
        lse_a = tl.load(base + 0, mask=mask_a, other=0.0)
        lse_b = tl.load(base + 1, mask=mask_a, other=0.0)
        kl = tl.load(base + 2, mask=mask_a, other=0.0)
        log_p = gt * scale - lse_a[:, None]
        log_q = gs * scale - lse_b[:, None]
        p = tl.where(valid, tl.exp(log_p), 0.0)
        if SIDE == 0:
            dg = tl.where(valid, tl.exp(log_q) - p, 0.0) * (g * scale)[:, None]
        else:
            dg = tl.where(valid, p * (log_p - log_q - kl[:, None]), 0.0) * (g * scale)[:, None]
    return dg


@autotuned(_GRAD_HALF, _GRAD_FLOAT32, triton.Config(dict(_INTERPRETER, BLOCK_DO=64, CHUNKS=2)), _KEY, "S")
@triton.jit
def _grad_kernel(S, T, INV_S, INV_T, STATS, G, DX, n, row_start, row_count, ds, dt,
                 s_row, s_col, t_row, t_col, scale, n_key,
                 KIND: tl.constexpr, CENTRED: tl.constexpr, SIDE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, CHUNKS: tl.constexpr, PRECISION: tl.constexpr,
                 INT64_OFFSETS: tl.constexpr):
    """DX[j, span] = Σ_i (dG_ji + dG_ij) x̂_i for this program's rows j (of all N) and span of D
    (CHUNKS chunks of BLOCK_DO), x̂ of SIDE: G = x̂x̂ᵀ sends row i's dG_ij to x̂_i (the row term, where
    j is a computed row) and to x̂_j (the column term, where i is). Since G is symmetric, the tile of
    rows j × columns i serves both terms: its rows' statistics give dG_ji, and read transposed with
    the columns' statistics it gives dG_ij. So each tile is computed once, and no atomics. A
    program whose rows are not computed rows only has column terms: it loops over the computed
    rows alone."""
    offs_j = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_j = offs_j < n
    computed_j = mask_j & (offs_j >= row_start) & (offs_j < row_start + row_count)
    if SIDE == 0:
        X, INV, dx, x_row, x_col = S, INV_S, ds, s_row, s_col
    else:
        X, INV, dx, x_row, x_col = T, INV_T, dt, t_row, t_col
    block_start = tl.program_id(0) * BLOCK_A
    has_rows = (block_start < row_start + row_count) & (block_start + BLOCK_A > row_start)
    lo = tl.where(has_rows, 0, row_start)
    hi = tl.where(has_rows, n, row_start + row_count)
    offs_do0 = tl.program_id(1) * (CHUNKS * BLOCK_DO) + tl.arange(0, BLOCK_DO)
    acc0 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_A, BLOCK_DO), dtype=tl.float32)
    for i0 in range(lo, hi, BLOCK_B):
        offs_i = i0 + tl.arange(0, BLOCK_B)
        mask_i = offs_i < hi
        computed_i = mask_i & (offs_i >= row_start) & (offs_i < row_start + row_count)
        gs, gt, valid = _both_tiles(S, T, INV_S, INV_T, offs_j, offs_i, mask_j, mask_i, ds, dt,
                                    s_row, s_col, t_row, t_col, BLOCK_A, BLOCK_B, BLOCK_D, PRECISION, INT64_OFFSETS)
        rows = _d_from_tiles(gs, gt, valid & computed_j[:, None], STATS, G, offs_j, computed_j, n, row_start,
                             scale, KIND, CENTRED, SIDE)
        cols = _d_from_tiles(tl.trans(gs), tl.trans(gt), tl.trans(valid & computed_i[None, :]), STATS, G, offs_i,
                             computed_i, n, row_start, scale, KIND, CENTRED, SIDE)
        weights = (rows + tl.trans(cols)) * tl.load(INV + offs_i, mask=mask_i, other=0.0)[None, :]
        acc0, acc1, acc2 = accumulate_chunks(acc0, acc1, acc2, weights, X, offs_i, mask_i, offs_do0, dx, x_row, x_col,
                                             BLOCK_DO, CHUNKS, PRECISION, INT64_OFFSETS)
    store_chunks(DX, acc0, acc1, acc2, offs_j, mask_j, offs_do0, dx, BLOCK_DO, CHUNKS, INT64_OFFSETS)


# --------------------------------------------------------------------------------------------------
# Launchers. No autograd here.
# --------------------------------------------------------------------------------------------------


def _common(s, t, scale, row_start, row_count):
    """The arguments every kernel takes after its pointers, in order."""
    n = s.shape[0]
    return (n, row_start, row_count, s.shape[1], t.shape[1],
            s.stride(0), s.stride(1), t.stride(0), t.stride(1), scale, size_key(n))


def _centred(kind, scale, normalize):
    """Whether kl takes its centred form: cosine similarities (|G| ≤ 1) at a bounded scale, as
    chunked's (chunked.KL_CENTRED_MAX_SCALE)."""
    return kind == "kl" and normalize and abs(scale) <= chunked.KL_CENTRED_MAX_SCALE


def _rows(s, t, inv_s, inv_t, kind, centred, scale, row_start, row_count):
    loss = torch.empty(row_count, device=s.device, dtype=torch.float32)
    stats = torch.empty(row_count, N_STATS, device=s.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(row_count, meta["BLOCK_A"]),)  # noqa: E731
    # int64 indices where the inputs need them; the (row_count, 5) statistics would only past 429M rows.
    _rows_kernel[grid](s, t, inv_s, inv_t, loss, stats, *_common(s, t, scale, row_start, row_count),
                       KIND=KIND_CODES[kind], CENTRED=centred, PRECISION=precision(s),
                       INT64_OFFSETS=needs_int64_offsets(s, t))
    return loss, stats


def _side_grad(s, t, inv_s, inv_t, stats, grad, kind, centred, scale, row_start, row_count, side):
    """dx̂ (N, D_side) float32 of one side: the row terms of the computed rows and the column terms."""
    x = s if side == 0 else t
    n, d = x.shape
    d_hat = torch.empty(n, d, device=s.device, dtype=torch.float32)
    grid = span_grid(n, d)
    _grad_kernel[grid](s, t, inv_s, inv_t, stats, grad, d_hat, *_common(s, t, scale, row_start, row_count),
                       KIND=KIND_CODES[kind], CENTRED=centred, SIDE=side, PRECISION=precision(s),
                       INT64_OFFSETS=needs_int64_offsets(s, t, d_hat))
    return d_hat


def structure_tile_forward(s, t, kind: str, scale: float, normalize: bool, row_start: int, row_count: int):
    """As chunked.structure_tile_forward: per-row losses (row_count,), float32. Inputs of two
    dtypes are computed in their promoted one: the kernels' dots take one precision."""
    s, t = common_dtype(s, t)
    loss, _ = _rows(s, t, inverse_norms(s, normalize), inverse_norms(t, normalize), kind,
                    _centred(kind, scale, normalize), scale, row_start, row_count)
    return loss


def structure_tile_forward_with_grad(s, t, kind: str, scale: float, normalize: bool, row_start: int,
                                     row_count: int, need_s: bool, need_t: bool):
    """As chunked.structure_tile_forward_with_grad: (loss_sum (), ds, dt) in float32."""
    s, t = common_dtype(s, t)
    inv_s, inv_t = inverse_norms(s, normalize), inverse_norms(t, normalize)
    centred = _centred(kind, scale, normalize)
    loss, stats = _rows(s, t, inv_s, inv_t, kind, centred, scale, row_start, row_count)
    ones = torch.ones_like(loss)
    grads = []
    for side, (x, needed) in enumerate(((s, need_s), (t, need_t))):
        if not needed:
            grads.append(loss.new_empty(0))
            continue
        d_hat = _side_grad(s, t, inv_s, inv_t, stats, ones, kind, centred, scale, row_start, row_count, side)
        grads.append(input_grad(d_hat, x, normalize))
    return loss.sum(), grads[0], grads[1]


structure_gram_forward = chunked.structure_gram_forward
structure_gram_forward_with_grad = chunked.structure_gram_forward_with_grad
