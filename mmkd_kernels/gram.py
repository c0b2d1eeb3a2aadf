"""The `gram` algorithm of the structure loss (DESIGN §1.2): exact, from D×D cross-products.

For ``mse`` and ``pearson`` every per-row sum over j ≠ i is a quadratic form in D×D statistics, so
O(N·D²) work and O(N·D + D²) memory replace the O(N²·D) tiles. Inputs are the rows s (N, Ds) and
t (N, Dt) in any float dtype; x = ŝ and y = t̂ are their L2-normalized rows where ``normalize``
(else s and t themselves), formed block by block (``_Rows``), never as whole copies.

Both kinds center the columns, xc = x − x̄ and yc = y − ȳ (the means over all N rows), and build
on Ac = xcᵀxc, Bc = ycᵀyc, Cc = xcᵀyc. Embeddings share a large common direction, so the
similarities share a large common part; from uncentred statistics each row's sum is a small
difference of quadratic forms of order N, and the centring takes that common part off first.

- mse: with Δ_ij = x_i·x_j − y_i·y_j = c_ij + α_i, c_ij = x_i·xc_j − y_i·yc_j (Σ_j c_ij = 0) and
  α_i = x_i·x̄ − y_i·ȳ:
  Σ_{j≠i} Δ_ij² = x_iᵀAc x_i + y_iᵀBc y_i − 2 x_iᵀCc y_i + N α_i² − δ_i²,  δ_i = Δ_ii = ‖x_i‖² − ‖y_i‖².
  (From A = xᵀx, B = yᵀy, C = xᵀy uncentred, rows of mean cosine 0.999 and a student 3e-3 from
  its teacher gave a loss 1.2e-4 off, even in float64: tests/test_structure.py.)
- pearson: a row's variance and covariance do not change when every column vector is shifted by
  the same vector, so the centring also removes the cancellation of Σw² − (Σw)²/n. With
  u_i = x_i·xc_i, v_i = y_i·yc_i, κ = 1 + 1/(N−1):
  cov_i = x_iᵀCc y_i − κ u_i v_i,  var^S_i = x_iᵀAc x_i − κ u_i²,  var^T_i = y_iᵀBc y_i − κ v_i².

The algebra runs in float64 whatever the inputs' dtype, over blocks of rows. When the student is
close to its teacher (late in distillation), the terms of each row's sums are of order 1 and the
result small: pearson's 1 − cov/√(var·var) keeps about 1e-3 of them, and mse is a small difference
of three quadratic forms. Float32 quadratic forms left the pearson loss 2e-5 off there
(benchmarks/results/accuracy-cpu-2026-11-25.md at 97bee92), past float32's 1e-5 tolerance. The
float64 rows live one block at a time, so the extra memory is that of a few blocks, the D×D
matrices and the gradients; losses and gradients come back in the accumulation dtype (float32, or
float64 for float64 inputs).

``reduce`` sums a statistic over the rows of every rank (identity in one process, a
``torch.distributed`` all-reduce across ranks), so the same code gives the global-batch loss from
local rows: statistics are reduced in forward, their gradients in backward. Every rank calls it
the same number of times, whatever its row count (zero included). ``n_total`` is the global N.
The backward is written out (no autograd), so that ``ops.py`` can register it.
"""

import torch

from . import switches
from .reference import EPS, accumulation_dtype

WIDE = torch.float64
# Elements of one (block × D) float64 temporary: 2**20, 8 MiB; a few are alive at once.
BLOCK_ELEMENTS = 2**20
BLOCK_ELEMENTS_VARIABLE = "MMKD_GRAM_BLOCK_ELEMENTS"


def block_elements() -> int:
    """Elements of one (block × D) float64 temporary: BLOCK_ELEMENTS, or the environment's
    MMKD_GRAM_BLOCK_ELEMENTS. Each block costs a few dozen operations, each a kernel launch on a
    GPU, so larger blocks launch fewer kernels for more memory; the GPU benchmark measures both."""
    value = switches.positive_int(BLOCK_ELEMENTS_VARIABLE,
                                  f"elements of one float64 block of the gram algorithm, default {BLOCK_ELEMENTS}")
    return BLOCK_ELEMENTS if value is None else value


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _blocks(x: torch.Tensor, y: torch.Tensor):
    """Row slices covering x and y, about ``block_elements()`` elements of the wider one each."""
    rows = max(1, block_elements() // max(x.shape[1], y.shape[1], 1))
    return [slice(start, start + rows) for start in range(0, x.shape[0], rows)]


class _Rows:
    """One input's rows x (N, D), served a block at a time in float64 and normalized there,
    x̂ = x / max(‖x‖, eps), where ``normalize``; ``grad`` takes a block's gradient with respect to
    x̂ back through the normalization, dx = (dx̂ − x̂ (x̂·dx̂)) / ‖x‖ (dx̂ / eps where ‖x‖ ≤ eps).
    Only the norms (N,) are kept: no whole normalized or widened copy of x."""

    def __init__(self, x: torch.Tensor, normalize: bool):
        self.raw = x
        self.norms = torch.linalg.vector_norm(x, dim=1, dtype=WIDE).clamp_min_(EPS) if normalize else None

    def __getitem__(self, block: slice) -> torch.Tensor:
        """x̂ of the rows in ``block``, float64 (a view of x itself where x is float64 and not
        normalized: callers never write to it)."""
        if self.norms is None:
            return self.raw[block].to(WIDE)
        return torch.div(self.raw[block], self.norms[block, None])  # widened by type promotion

    def grad(self, block: slice, d_hat: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to the rows of ``block`` from d_hat (in place), x_hat = self[block]."""
        if self.norms is None:
            return d_hat
        norms = self.norms[block, None]
        radial = (x_hat * d_hat).sum(dim=1, keepdim=True).mul_(norms > EPS)
        return d_hat.sub_(x_hat * radial).div_(norms)

    def column_sum(self, blocks) -> torch.Tensor:
        """Σ_i x̂_i (D,) in float64."""
        total = self.raw.new_zeros(self.raw.shape[1], dtype=WIDE)
        for block in blocks:
            total += self[block].sum(dim=0)
        return total


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


def _statistic_gradients(x, y, w_a, w_b, w_c, need_x, need_y, blocks, reduce, first_x=None, first_y=None):
    """The gradients of the D×D statistics A (x with x), B (y with y) and C (x with y) from per-row
    weights (N,): xᵀdiag(w_a)x, yᵀdiag(w_b)y, xᵀdiag(w_c)y in float64, all-reduced. A's reaches dx
    only and B's dy only, so each is None (and not computed) where its input needs no gradient.
    With ``first_x`` (N,) weights, also the first moment Σ_i first_x_i x_i (Ds,) where dx is
    needed, and likewise for y (else None): they ride the same pass and all-reduce."""
    ds, dt = x.raw.shape[1], y.raw.shape[1]
    first_x = first_x if need_x else None
    first_y = first_y if need_y else None
    shapes = ([(ds, ds)] * need_x + [(dt, dt)] * need_y + [(ds, dt)]
              + [(ds, 1)] * (first_x is not None) + [(dt, 1)] * (first_y is not None))

    def pairs(block):
        xb, yb = x[block], y[block]
        weighted = [(xb, xb * w_a[block, None].to(WIDE))] if need_x else []
        weighted += [(yb, yb * w_b[block, None].to(WIDE))] if need_y else []
        weighted += [(xb, yb * w_c[block, None].to(WIDE))]
        weighted += [(xb, first_x[block, None].to(WIDE))] if first_x is not None else []
        return weighted + ([(yb, first_y[block, None].to(WIDE))] if first_y is not None else [])

    mats = _summed_products(pairs, blocks, shapes, x.raw, reduce)
    d_a = mats.pop(0) if need_x else None
    d_b = mats.pop(0) if need_y else None
    d_c = mats.pop(0)
    moment_x = mats.pop(0).view(-1) if first_x is not None else None
    moment_y = mats.pop(0).view(-1) if first_y is not None else None
    return d_a, d_b, d_c, moment_x, moment_y


def _gradient_buffers(x, y, need_x, need_y):
    """(dx, dy) for the rows of x and y in the accumulation dtype, None where not needed."""
    acc = accumulation_dtype(x.raw, y.raw)
    return (x.raw.new_empty(x.raw.shape, dtype=acc) if need_x else None,
            y.raw.new_empty(y.raw.shape, dtype=acc) if need_y else None)


class _Centred:
    """The column means x̄, ȳ (over every rank's rows) and the centred D×D statistics in float64,
    Ac = xcᵀxc, Bc = ycᵀyc, Cc = xcᵀyc with xc = x − x̄, yc = y − ȳ. Both kinds build on them: the
    centring removes the common part of the similarities, which both would otherwise cancel."""

    def __init__(self, x, y, n_total, blocks, reduce):
        self.x, self.y, self.blocks, self.n_total = x, y, blocks, n_total
        ds, dt = x.raw.shape[1], y.raw.shape[1]
        sums = reduce(torch.cat([x.column_sum(blocks), y.column_sum(blocks)]))
        self.mean_x, self.mean_y = (sums / n_total).split([ds, dt])

        def pairs(block):
            xc, yc = self.centred(x[block], y[block])
            return (xc, xc), (yc, yc), (xc, yc)

        self.ac, self.bc, self.cc = _summed_products(pairs, blocks, [(ds, ds), (dt, dt), (ds, dt)], x.raw, reduce)

    def centred(self, xb, yb):
        """xc, yc of a block's float64 rows xb, yb: the column means taken off."""
        return xb - self.mean_x, yb - self.mean_y


# --------------------------------------------------------------------------------------------------
# mse
# --------------------------------------------------------------------------------------------------


def _mse_rows(stats, xb, yb):
    """Σ_{j≠i} Δ_ij² of a block's rows, Δ_ij = x_i·x_j − y_i·y_j (module docstring), and α_i, δ_i."""
    alpha = xb @ stats.mean_x - yb @ stats.mean_y
    delta = (xb * xb).sum(dim=1) - (yb * yb).sum(dim=1)
    rows = _quadratic(xb, stats.ac, xb) + _quadratic(yb, stats.bc, yb) - 2 * _quadratic(xb, stats.cc, yb)
    return rows.add_(stats.n_total * alpha * alpha).sub_(delta * delta), alpha, delta


def _mse_forward(x, y, n_total, blocks, reduce):
    stats = _Centred(x, y, n_total, blocks, reduce)
    rows = x.raw.new_empty(x.raw.shape[0], dtype=accumulation_dtype(x.raw, y.raw))
    for block in blocks:
        rows[block] = _mse_rows(stats, x[block], y[block])[0] / (n_total - 1)
    return rows


def _mse_backward(h, x, y, n_total, need_x, need_y, blocks, reduce):
    """h = grad / (N − 1) (N,). Gradients of Σ_i h_i·rows_i, rows_i the sum before the division.

    With Δ_ij = c_ij + α_i (all j, the diagonal taken off by δ_i):
    ∂/∂x_i = 2h_i(Ac x_i − Cc y_i + N α_i x̄) − 4h_i δ_i x_i + 2 Σ_j h_j Δ_ij x_j, and
    Σ_j h_j Δ_ij x_j = P_xxᵀ x_i − P_yxᵀ y_i + α_i Σ_j h_j x_j with P_xx = Σ_j h_j xc_j x_jᵀ,
    P_yx = Σ_j h_j yc_j x_jᵀ; for y the same with the roles of x and y exchanged and the signs
    of Δ's terms turned. Every product pairs a centred factor with another, as in the forward."""
    stats = _Centred(x, y, n_total, blocks, reduce)
    ds, dt = x.raw.shape[1], y.raw.shape[1]
    shapes = [(ds, ds), (dt, ds), (ds, 1)] * need_x + [(ds, dt), (dt, dt), (dt, 1)] * need_y

    def pairs(block):
        xb, yb, hb = x[block], y[block], h[block, None].to(WIDE)
        xc, yc = stats.centred(xb, yb)
        hx, hy = xb * hb, yb * hb
        return [(xc, hx), (yc, hx), (xb, hb)] * need_x + [(xc, hy), (yc, hy), (yb, hb)] * need_y

    mats = _summed_products(pairs, blocks, shapes, x.raw, reduce) if shapes else []
    if need_x:
        p_xx, p_yx, m_x = mats[0], mats[1], mats[2].view(-1)
    if need_y:
        p_xy, p_yy, m_y = mats[-3], mats[-2], mats[-1].view(-1)
    rows = x.raw.new_empty(x.raw.shape[0], dtype=accumulation_dtype(x.raw, y.raw))
    dx, dy = _gradient_buffers(x, y, need_x, need_y)
    for block in blocks:
        xb, yb, hb = x[block], y[block], h[block].to(WIDE)
        block_rows, alpha, delta = _mse_rows(stats, xb, yb)
        rows[block] = block_rows / (n_total - 1)
        h2, n_alpha = 2 * hb[:, None], n_total * alpha[:, None]
        if need_x:
            own = (xb @ stats.ac).sub_(yb @ stats.cc.T).add_(n_alpha * stats.mean_x).mul_(h2)
            spread = (xb @ p_xx).sub_(yb @ p_yx).add_(alpha[:, None] * m_x).mul_(2)
            dx[block] = x.grad(block, own.add_(spread).sub_((2 * h2 * delta[:, None]) * xb), xb)
        if need_y:
            own = (yb @ stats.bc).sub_(xb @ stats.cc).sub_(n_alpha * stats.mean_y).mul_(h2)
            spread = (xb @ p_xy).sub_(yb @ p_yy).add_(alpha[:, None] * m_y).mul_(2)
            dy[block] = y.grad(block, own.sub_(spread).add_((2 * h2 * delta[:, None]) * yb), yb)
    return rows, dx, dy


# --------------------------------------------------------------------------------------------------
# pearson
# --------------------------------------------------------------------------------------------------


class _Pearson(_Centred):
    """The centred statistics and the per-row pearson terms from them.

    The block loop of ``rows`` holds only the work on (block × D) matrices; the per-row arithmetic
    runs once on (N,) vectors after it. Each operation is a kernel launch on a GPU, so this keeps
    the launches per block few."""

    def __init__(self, x, y, n_total, blocks, reduce):
        super().__init__(x, y, n_total, blocks, reduce)
        self.kappa = 1 + 1 / (n_total - 1)

    def rows(self):
        """cov, var^S, var^T (N,) and u, v, the terms they are built from."""
        forms = self.x.raw.new_empty((5, self.x.raw.shape[0]), dtype=WIDE)  # u, v, x·Cc·y, x·Ac·x, y·Bc·y
        for block in self.blocks:
            xb, yb = self.x[block], self.y[block]
            xc, yc = self.centred(xb, yb)
            for row, (a, b) in enumerate([(xb, xc), (yb, yc), (xb @ self.cc, yb), (xb @ self.ac, xb),
                                          (yb @ self.bc, yb)]):
                forms[row, block] = torch.einsum("ij,ij->i", a, b)
        u, v, qc, qa, qb = forms
        k = self.kappa
        return qc.sub_(k * u * v), qa.sub_(k * u * u), qb.sub_(k * v * v), u, v


def _pearson_r(cov, var_s, var_t):
    product = var_s * var_t
    return cov / product.clamp_min(EPS**2).sqrt(), product


def _pearson_forward(x, y, n_total, blocks, reduce):
    cov, var_s, var_t, _, _ = _Pearson(x, y, n_total, blocks, reduce).rows()
    return (1 - _pearson_r(cov, var_s, var_t)[0]).to(accumulation_dtype(x.raw, y.raw))


def _pearson_backward(g_r, x, y, n_total, need_x, need_y, blocks, reduce):
    """g_r: gradient with respect to r_i (the loss is 1 − r_i)."""
    stats = _Pearson(x, y, n_total, blocks, reduce)
    cov, var_s, var_t, u, v = stats.rows()
    r, product = _pearson_r(cov, var_s, var_t)
    g = g_r.to(WIDE)
    unclamped = product > EPS**2
    g_cov = g / product.clamp_min(EPS**2).sqrt()
    g_var_s = torch.where(unclamped, -0.5 * g * r / var_s, 0.0)
    g_var_t = torch.where(unclamped, -0.5 * g * r / var_t, 0.0)
    g_u = -stats.kappa * (g_cov * v + 2 * g_var_s * u)
    g_v = -stats.kappa * (g_cov * u + 2 * g_var_t * v)
    # dG/dx_i has a direct part and one through every centred row xc_j = x_j − mean(x): the latter,
    # dxc_j = g_u_j x_j + 2 d_Ac xc_j + d_Cc yc_j, reaches each x_j and, through the mean, every row
    # by −Σ_j dxc_j / N. Σ_j xc_j = Σ_j yc_j = 0 over all rows (of every rank), so that sum is the
    # first moment Σ_j g_u_j x_j, known before the rows' pass: each block's gradient is final there.
    # Per block, via_centred = dxc − that shift, and direct the part that holds xc fixed.
    d_ac, d_bc, d_cc, moment_x, moment_y = _statistic_gradients(
        x, y, g_var_s, g_var_t, g_cov, need_x, need_y, blocks, reduce, first_x=g_u, first_y=g_v)
    dx, dy = _gradient_buffers(x, y, need_x, need_y)
    # Per-row weights as (N, 1) columns, and the D×D factors, once.
    g_cov, g_u, g_v = g_cov[:, None], g_u[:, None], g_v[:, None]
    g_var_s2, g_var_t2 = 2 * g_var_s[:, None], 2 * g_var_t[:, None]
    if need_x:
        d_ac2, shift_x = 2 * d_ac, moment_x / n_total
    if need_y:
        d_bc2, shift_y = 2 * d_bc, moment_y / n_total
    for block in blocks:
        xb, yb = x[block], y[block]
        xc, yc = stats.centred(xb, yb)
        if need_x:
            via_centred = torch.addmm(g_u[block] * xb, xc, d_ac2).addmm_(yc, d_cc.T).sub_(shift_x)
            direct = (yb @ stats.cc.T).mul_(g_cov[block]).addcmul_(xb @ stats.ac, g_var_s2[block])
            dx[block] = x.grad(block, direct.addcmul_(xc, g_u[block]).add_(via_centred), xb)
        if need_y:
            via_centred = torch.addmm(g_v[block] * yb, yc, d_bc2).addmm_(xc, d_cc).sub_(shift_y)
            direct = (xb @ stats.cc).mul_(g_cov[block]).addcmul_(yb @ stats.bc, g_var_t2[block])
            dy[block] = y.grad(block, direct.addcmul_(yc, g_v[block]).add_(via_centred), yb)
    return (1 - r).to(accumulation_dtype(x.raw, y.raw)), dx, dy


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def gram_forward(s, t, kind: str, n_total: int, normalize: bool, reduce=_identity) -> torch.Tensor:
    """Per-row losses (N,) of ``kind`` ("mse" or "pearson") of the rows s (N, Ds), t (N, Dt), in
    the accumulation dtype, as ``reference.structure_rows``."""
    x, y = _Rows(s, normalize), _Rows(t, normalize)
    blocks = _blocks(s, t)
    if kind == "mse":
        return _mse_forward(x, y, n_total, blocks, reduce)
    return _pearson_forward(x, y, n_total, blocks, reduce)


def gram_backward(grad, s, t, kind: str, n_total: int, normalize: bool, need_s: bool, need_t: bool,
                  reduce=_identity):
    """(per-row losses, ds, dt) in the accumulation dtype: the gradients of Σ_i grad_i·row_loss_i
    with respect to s and t, None where not needed.

    The per-row losses come for free from the statistics the gradients need, so a caller that
    wants both (a forward with gradients) makes one call.

    With ``reduce`` an all-reduce, each rank gets the gradient of the sum of every rank's losses
    with respect to its own rows: the D×D statistics' gradients are summed over ranks.
    """
    x, y = _Rows(s, normalize), _Rows(t, normalize)
    blocks = _blocks(s, t)
    if kind == "mse":
        return _mse_backward(grad / (n_total - 1), x, y, n_total, need_s, need_t, blocks, reduce)
    return _pearson_backward(-grad, x, y, n_total, need_s, need_t, blocks, reduce)
