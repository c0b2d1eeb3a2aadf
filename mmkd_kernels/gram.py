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

``reduce`` sums a statistic over the rows of every rank (identity in one process, a
``torch.distributed`` all-reduce across ranks), so the same code gives the global-batch loss from
local rows: statistics are reduced in forward, their gradients in backward. ``n_total`` is the
global N. The backward is written out (no autograd), so that ``ops.py`` can register it.
"""

import torch

from .reference import EPS


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _quadratic(x: torch.Tensor, mat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(x_i @ mat) · y_i for every row i."""
    return (x @ mat).mul_(y).sum(dim=1)


def _pearson_statistics(x, y, n_total, reduce):
    xc = x - reduce(x.sum(dim=0)) / n_total
    yc = y - reduce(y.sum(dim=0)) / n_total
    mats = reduce(torch.cat([(xc.T @ xc).flatten(), (yc.T @ yc).flatten(), (xc.T @ yc).flatten()]))
    ds, dt = x.shape[1], y.shape[1]
    ac, bc, cc = mats.split([ds * ds, dt * dt, ds * dt])
    return xc, yc, ac.view(ds, ds), bc.view(dt, dt), cc.view(ds, dt)


def _pearson_rows(x, y, xc, yc, ac, bc, cc, n_total):
    kappa = 1 + 1 / (n_total - 1)
    u, v = (x * xc).sum(dim=1), (y * yc).sum(dim=1)
    cov = _quadratic(x, cc, y) - kappa * u * v
    var_s = _quadratic(x, ac, x) - kappa * u * u
    var_t = _quadratic(y, bc, y) - kappa * v * v
    return u, v, cov, var_s, var_t


def _mse_statistics(x, y, reduce):
    ds, dt = x.shape[1], y.shape[1]
    mats = reduce(torch.cat([(x.T @ x).flatten(), (y.T @ y).flatten(), (x.T @ y).flatten()]))
    a, b, c = mats.split([ds * ds, dt * dt, ds * dt])
    return a.view(ds, ds), b.view(dt, dt), c.view(ds, dt)


def gram_forward(x, y, kind: str, n_total: int, reduce=_identity) -> torch.Tensor:
    """Per-row losses (N,) of ``kind`` ("mse" or "pearson"), as ``reference.structure_rows``."""
    if kind == "mse":
        a, b, c = _mse_statistics(x, y, reduce)
        diag = (x * x).sum(dim=1) - (y * y).sum(dim=1)
        rows = _quadratic(x, a, x) + _quadratic(y, b, y) - 2 * _quadratic(x, c, y) - diag * diag
        return rows / (n_total - 1)
    xc, yc, ac, bc, cc = _pearson_statistics(x, y, n_total, reduce)
    _, _, cov, var_s, var_t = _pearson_rows(x, y, xc, yc, ac, bc, cc, n_total)
    return 1 - cov / (var_s * var_t).clamp_min(EPS**2).sqrt()


def gram_backward(grad, x, y, kind: str, n_total: int, need_x: bool, need_y: bool, reduce=_identity):
    """(per-row losses, dx, dy): the gradients of Σ_i grad_i·row_loss_i, None where not needed.

    The per-row losses come for free from the statistics the gradients need, so a caller that
    wants both (a forward with gradients) makes one call.

    With ``reduce`` an all-reduce, each rank gets the gradient of the sum of every rank's losses
    with respect to its own rows: the D×D statistics' gradients are summed over ranks.
    """
    if kind == "mse":
        return _mse_backward(grad / (n_total - 1), x, y, n_total, need_x, need_y, reduce)
    return _pearson_backward(-grad, x, y, n_total, need_x, need_y, reduce)


def _mse_backward(h, x, y, n_total, need_x, need_y, reduce):
    a, b, c = _mse_statistics(x, y, reduce)
    diag = (x * x).sum(dim=1) - (y * y).sum(dim=1)
    rows = _quadratic(x, a, x) + _quadratic(y, b, y) - 2 * _quadratic(x, c, y) - diag * diag
    hx, hy = x * h[:, None], y * h[:, None]
    ds, dt = x.shape[1], y.shape[1]
    mats = reduce(torch.cat([(x.T @ hx).flatten(), (y.T @ hy).flatten(), (x.T @ hy).flatten()]))
    da, db, dc = mats.split([ds * ds, dt * dt, ds * dt])
    da, db, dc = da.view(ds, ds), db.view(dt, dt), dc.view(ds, dt).mul(-2)
    dx = dy = None
    if need_x:
        dx = 2 * (hx @ a - hy @ c.T) - 4 * (h * diag)[:, None] * x + 2 * (x @ da) + y @ dc.T
    if need_y:
        dy = 2 * (hy @ b - hx @ c) + 4 * (h * diag)[:, None] * y + 2 * (y @ db) + x @ dc
    return rows / (n_total - 1), dx, dy


def _pearson_backward(g_r, x, y, n_total, need_x, need_y, reduce):
    """g_r: gradient with respect to r_i (the loss is 1 − r_i)."""
    xc, yc, ac, bc, cc = _pearson_statistics(x, y, n_total, reduce)
    u, v, cov, var_s, var_t = _pearson_rows(x, y, xc, yc, ac, bc, cc, n_total)
    product = var_s * var_t
    unclamped = product > EPS**2
    denom = product.clamp_min(EPS**2).sqrt()
    r = cov / denom
    zero = torch.zeros_like(r)
    g_cov = g_r / denom
    g_var_s = torch.where(unclamped, -0.5 * g_r * r / var_s, zero)
    g_var_t = torch.where(unclamped, -0.5 * g_r * r / var_t, zero)
    kappa = 1 + 1 / (n_total - 1)
    g_u = -kappa * (g_cov * v + 2 * g_var_s * u)
    g_v = -kappa * (g_cov * u + 2 * g_var_t * v)
    ds, dt = x.shape[1], y.shape[1]
    gx_s, gy_t, gy_c = x * g_var_s[:, None], y * g_var_t[:, None], y * g_cov[:, None]
    mats = reduce(torch.cat([(x.T @ gx_s).flatten(), (y.T @ gy_t).flatten(), (x.T @ gy_c).flatten()]))
    d_ac, d_bc, d_cc = mats.split([ds * ds, dt * dt, ds * dt])
    d_ac, d_bc, d_cc = d_ac.view(ds, ds), d_bc.view(dt, dt), d_cc.view(ds, dt)
    dx = dy = None
    if need_x:
        dx_direct = g_cov[:, None] * (y @ cc.T) + 2 * (gx_s @ ac) + g_u[:, None] * xc
        dxc = g_u[:, None] * x + 2 * (xc @ d_ac) + yc @ d_cc.T
        dx = dx_direct + dxc - reduce(dxc.sum(dim=0)) / n_total
    if need_y:
        dy_direct = g_cov[:, None] * (x @ cc) + 2 * (gy_t @ bc) + g_v[:, None] * yc
        dyc = g_v[:, None] * y + 2 * (yc @ d_bc) + xc @ d_cc
        dy = dy_direct + dyc - reduce(dyc.sum(dim=0)) / n_total
    return 1 - r, dx, dy
