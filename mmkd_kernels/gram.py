"""The `gram` algorithm of the structure loss (DESIGN §1.2): exact, from D×D cross-products.

For ``mse`` and ``pearson`` every per-row sum over j ≠ i is a quadratic form in D×D statistics, so
O(N·D²) work and O(N·D + D²) memory replace the O(N²·D) tiles. Inputs are the already normalized
rows x = ŝ (N, Ds), y = t̂ (N, Dt), in float32 or float64.

- mse: Σ_{j≠i}(G^S_ij − G^T_ij)² = x_iᵀA x_i + y_iᵀB y_i − 2 x_iᵀC y_i − (a_i − b_i)²,
  A = xᵀx, B = yᵀy, C = xᵀy, a_i = ‖x_i‖², b_i = ‖y_i‖².
- pearson: a row's variance and covariance do not change when every column vector is shifted by
  the same vector, so we center the columns, xc = x − mean(x), which removes the large common
  part of the similarities (the cancellation of Σw² − (Σw)²/n). With u_i = x_i·xc_i,
  v_i = y_i·yc_i, κ = 1 + 1/(N−1), Ac = xcᵀxc, Bc = ycᵀyc, Cc = xcᵀyc:
  cov_i = x_iᵀCc y_i − κ u_i v_i,  var^S_i = x_iᵀAc x_i − κ u_i²,  var^T_i = y_iᵀBc y_i − κ v_i².

The algebra runs in float64 whatever the inputs' dtype, over blocks of rows. When the student is
close to its teacher (late in distillation), the terms of each row's sums are of order 1 and the
result small: pearson's 1 − cov/√(var·var) keeps about 1e-3 of them, and mse is a small difference
of three quadratic forms. Float32 quadratic forms left the pearson loss 2e-5 off there
(benchmarks/results/accuracy-cpu-2026-11-25.md at 97bee92), past float32's 1e-5 tolerance. The
float64 copies live one block at a time, so the extra memory stays that of a few blocks and the
D×D matrices; the per-row outputs come back in the inputs' dtype.

``reduce`` sums a statistic over the rows of every rank (identity in one process, a
``torch.distributed`` all-reduce across ranks), so the same code gives the global-batch loss from
local rows: statistics are reduced in forward, their gradients in backward. Every rank calls it
the same number of times, whatever its row count (zero included). ``n_total`` is the global N.
The backward is written out (no autograd), so that ``ops.py`` can register it.
"""

import torch

from .reference import EPS

WIDE = torch.float64
# Elements of one (block × D) float64 temporary: 2**20, 8 MiB; a few are alive at once.
BLOCK_ELEMENTS = 2**20


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _blocks(x: torch.Tensor, y: torch.Tensor):
    """Row slices covering x and y, about BLOCK_ELEMENTS elements of the wider one each."""
    rows = max(256, BLOCK_ELEMENTS // max(x.shape[1], y.shape[1], 1))
    return [slice(start, start + rows) for start in range(0, x.shape[0], rows)]


def _quadratic(x: torch.Tensor, mat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(x_i @ mat) · y_i for every row i."""
    return (x @ mat).mul_(y).sum(dim=1)


def _summed_products(pairs, blocks, shapes, like, reduce):
    """Σ over the row blocks of aᵀb for each (a, b) of ``pairs(block)``: float64 matrices of
    ``shapes`` (zero where this rank has no rows), all-reduced in one call."""
    sums = [like.new_zeros(shape, dtype=WIDE) for shape in shapes]
    for block in blocks:
        for total, (a, b) in zip(sums, pairs(block)):
            total.addmm_(a.T, b)
    flat = reduce(torch.cat([m.flatten() for m in sums]))
    return [part.view(shape) for part, shape in zip(flat.split([m.numel() for m in sums]), shapes)]


def _statistic_gradients(x, y, w_a, w_b, w_c, need_x, need_y, blocks, reduce):
    """The gradients of the D×D statistics A (x with x), B (y with y) and C (x with y) from per-row
    weights (N,): xᵀdiag(w_a)x, yᵀdiag(w_b)y, xᵀdiag(w_c)y in float64, all-reduced. A's reaches dx
    only and B's dy only, so each is None (and not computed) where its input needs no gradient."""
    ds, dt = x.shape[1], y.shape[1]
    shapes = [(ds, ds)] * need_x + [(dt, dt)] * need_y + [(ds, dt)]

    def pairs(block):
        xb, yb = x[block].to(WIDE), y[block].to(WIDE)
        wa, wb, wc = (w[block].to(WIDE)[:, None] for w in (w_a, w_b, w_c))
        return [(xb, xb * wa)] * need_x + [(yb, yb * wb)] * need_y + [(xb, yb * wc)]

    mats = _summed_products(pairs, blocks, shapes, x, reduce)
    return mats.pop(0) if need_x else None, mats.pop(0) if need_y else None, mats.pop(0)


# --------------------------------------------------------------------------------------------------
# mse
# --------------------------------------------------------------------------------------------------


def _mse_statistics(x, y, blocks, reduce):
    """A = xᵀx, B = yᵀy, C = xᵀy in float64."""
    ds, dt = x.shape[1], y.shape[1]

    def pairs(block):
        xb, yb = x[block].to(WIDE), y[block].to(WIDE)
        return (xb, xb), (yb, yb), (xb, yb)

    return _summed_products(pairs, blocks, [(ds, ds), (dt, dt), (ds, dt)], x, reduce)


def _mse_rows(xb, yb, a, b, c):
    diag = (xb * xb).sum(dim=1) - (yb * yb).sum(dim=1)
    return _quadratic(xb, a, xb) + _quadratic(yb, b, yb) - 2 * _quadratic(xb, c, yb) - diag * diag, diag


def _mse_forward(x, y, n_total, blocks, reduce):
    a, b, c = _mse_statistics(x, y, blocks, reduce)
    rows = x.new_empty(x.shape[0])
    for block in blocks:
        rows[block] = _mse_rows(x[block].to(WIDE), y[block].to(WIDE), a, b, c)[0] / (n_total - 1)
    return rows


def _mse_backward(h, x, y, n_total, need_x, need_y, blocks, reduce):
    """h = grad / (N − 1) (N,). Gradients of Σ_i h_i·rows_i, rows_i the sum before the division."""
    a, b, c = _mse_statistics(x, y, blocks, reduce)
    da, db, dc = _statistic_gradients(x, y, h, h, h, need_x, need_y, blocks, reduce)
    dc = dc.mul_(-2)
    rows = x.new_empty(x.shape[0])
    dx = torch.empty_like(x) if need_x else None
    dy = torch.empty_like(y) if need_y else None
    for block in blocks:
        xb, yb, hb = x[block].to(WIDE), y[block].to(WIDE), h[block].to(WIDE)
        block_rows, diag = _mse_rows(xb, yb, a, b, c)
        rows[block] = block_rows / (n_total - 1)
        hx, hy, h_diag = xb * hb[:, None], yb * hb[:, None], (4 * hb * diag)[:, None]
        if need_x:
            dx[block] = 2 * (hx @ a - hy @ c.T) - h_diag * xb + 2 * (xb @ da) + yb @ dc.T
        if need_y:
            dy[block] = 2 * (hy @ b - hx @ c) + h_diag * yb + 2 * (yb @ db) + xb @ dc
    return rows, dx, dy


# --------------------------------------------------------------------------------------------------
# pearson
# --------------------------------------------------------------------------------------------------


class _Pearson:
    """The column means and centred D×D statistics (float64, over every rank's rows), and each
    block's per-row terms from them."""

    def __init__(self, x, y, n_total, blocks, reduce):
        self.x, self.y = x, y
        self.kappa = 1 + 1 / (n_total - 1)
        ds, dt = x.shape[1], y.shape[1]
        sums = reduce(torch.cat([x.sum(dim=0, dtype=WIDE), y.sum(dim=0, dtype=WIDE)]))
        self.mean_x, self.mean_y = (sums / n_total).split([ds, dt])

        def pairs(block):
            _, _, xc, yc = self.block(block)
            return (xc, xc), (yc, yc), (xc, yc)

        self.ac, self.bc, self.cc = _summed_products(pairs, blocks, [(ds, ds), (dt, dt), (ds, dt)], x, reduce)

    def block(self, block):
        """(x, y, xc, yc) of the rows in ``block``, float64."""
        xb, yb = self.x[block].to(WIDE), self.y[block].to(WIDE)
        return xb, yb, xb - self.mean_x, yb - self.mean_y

    def rows(self, xb, yb, xc, yc):
        """u, v, cov, var^S, var^T of the block's rows."""
        u, v = (xb * xc).sum(dim=1), (yb * yc).sum(dim=1)
        cov = _quadratic(xb, self.cc, yb) - self.kappa * u * v
        var_s = _quadratic(xb, self.ac, xb) - self.kappa * u * u
        var_t = _quadratic(yb, self.bc, yb) - self.kappa * v * v
        return u, v, cov, var_s, var_t


def _pearson_r(cov, var_s, var_t):
    product = var_s * var_t
    return cov / product.clamp_min(EPS**2).sqrt(), product


def _pearson_forward(x, y, n_total, blocks, reduce):
    stats = _Pearson(x, y, n_total, blocks, reduce)
    losses = x.new_empty(x.shape[0])
    for block in blocks:
        _, _, cov, var_s, var_t = stats.rows(*stats.block(block))
        losses[block] = 1 - _pearson_r(cov, var_s, var_t)[0]
    return losses


def _pearson_backward(g_r, x, y, n_total, need_x, need_y, blocks, reduce):
    """g_r: gradient with respect to r_i (the loss is 1 − r_i)."""
    stats = _Pearson(x, y, n_total, blocks, reduce)
    n = x.shape[0]
    terms = x.new_empty((6, n), dtype=WIDE)  # r, g_cov, g_var_s, g_var_t, g_u, g_v per row
    for block in blocks:
        u, v, cov, var_s, var_t = stats.rows(*stats.block(block))
        r, product = _pearson_r(cov, var_s, var_t)
        g = g_r[block].to(WIDE)
        unclamped = product > EPS**2
        g_cov = g / product.clamp_min(EPS**2).sqrt()
        g_var_s = torch.where(unclamped, -0.5 * g * r / var_s, 0.0)
        g_var_t = torch.where(unclamped, -0.5 * g * r / var_t, 0.0)
        g_u = -stats.kappa * (g_cov * v + 2 * g_var_s * u)
        g_v = -stats.kappa * (g_cov * u + 2 * g_var_t * v)
        terms[:, block] = torch.stack([r, g_cov, g_var_s, g_var_t, g_u, g_v])
    r, g_cov, g_var_s, g_var_t, g_u, g_v = terms
    ds, dt = x.shape[1], y.shape[1]
    d_ac, d_bc, d_cc = _statistic_gradients(x, y, g_var_s, g_var_t, g_cov, need_x, need_y, blocks, reduce)
    dx = torch.empty_like(x) if need_x else None
    dy = torch.empty_like(y) if need_y else None
    # dG/dx_i has a direct part and one through every centred row xc_j = x_j − mean(x): the latter,
    # dxc, reaches each x_j and, through the mean, every row by −Σ_j dxc_j / N.
    dxc_sum = x.new_zeros(ds, dtype=WIDE)
    dyc_sum = y.new_zeros(dt, dtype=WIDE)
    for block in blocks:
        xb, yb, xc, yc = stats.block(block)
        if need_x:
            direct = g_cov[block, None] * (yb @ stats.cc.T) + 2 * g_var_s[block, None] * (xb @ stats.ac)
            dxc = g_u[block, None] * xb + 2 * (xc @ d_ac) + yc @ d_cc.T
            dxc_sum += dxc.sum(dim=0)
            dx[block] = direct + g_u[block, None] * xc + dxc
        if need_y:
            direct = g_cov[block, None] * (xb @ stats.cc) + 2 * g_var_t[block, None] * (yb @ stats.bc)
            dyc = g_v[block, None] * yb + 2 * (yc @ d_bc) + xc @ d_cc
            dyc_sum += dyc.sum(dim=0)
            dy[block] = direct + g_v[block, None] * yc + dyc
    shifts = (reduce(torch.cat([dxc_sum, dyc_sum])) / n_total).split([ds, dt])
    if need_x:
        dx -= shifts[0].to(dx.dtype)
    if need_y:
        dy -= shifts[1].to(dy.dtype)
    return (1 - r).to(x.dtype), dx, dy


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def gram_forward(x, y, kind: str, n_total: int, reduce=_identity) -> torch.Tensor:
    """Per-row losses (N,) of ``kind`` ("mse" or "pearson") in x's dtype, as ``reference.structure_rows``."""
    blocks = _blocks(x, y)
    if kind == "mse":
        return _mse_forward(x, y, n_total, blocks, reduce)
    return _pearson_forward(x, y, n_total, blocks, reduce)


def gram_backward(grad, x, y, kind: str, n_total: int, need_x: bool, need_y: bool, reduce=_identity):
    """(per-row losses, dx, dy) in x's and y's dtypes: the gradients of Σ_i grad_i·row_loss_i, None
    where not needed.

    The per-row losses come for free from the statistics the gradients need, so a caller that
    wants both (a forward with gradients) makes one call.

    With ``reduce`` an all-reduce, each rank gets the gradient of the sum of every rank's losses
    with respect to its own rows: the D×D statistics' gradients are summed over ranks.
    """
    blocks = _blocks(x, y)
    if kind == "mse":
        return _mse_backward(grad / (n_total - 1), x, y, n_total, need_x, need_y, blocks, reduce)
    return _pearson_backward(-grad, x, y, n_total, need_x, need_y, blocks, reduce)
