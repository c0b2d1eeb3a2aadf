"""The `chunked` backend: plain PyTorch over row blocks, recomputing each block in backward.

No N×N matrix is ever stored: a block of rows against all columns (block × M) is the largest
temporary, and forward saves only per-row statistics (the log-sum-exp, the per-row losses). Works on
any device and dtype; half-precision inputs are computed in float32, float64 in float64.

These are kernels in the DESIGN §3 sense: they know nothing of autograd (``ops.py`` wires them as
custom ops). The `gram` algorithm of the structure loss lives in ``gram.py``.
"""

import torch

from . import gram
from .normalization import normalize_backward, normalize_forward
from .reference import EPS, accumulation_dtype

# Elements of one (block × M) temporary: 2**21 floats = 8 MiB in float32, a few live at once.
BLOCK_ELEMENTS = 2**21


def row_block(n_cols: int) -> int:
    """Rows per block so that a (block × n_cols) tile holds about BLOCK_ELEMENTS elements."""
    return max(16, min(4096, BLOCK_ELEMENTS // max(n_cols, 1)))


def _prepare(x: torch.Tensor, normalize: bool, acc: torch.dtype):
    return normalize_forward(x.to(acc), normalize)


def _to_input_grad(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.to(like.dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# Contrastive loss (DESIGN §1.1)
# --------------------------------------------------------------------------------------------------


def contrastive_forward(q, k, targets, scale: float, normalize: bool, symmetric: bool):
    """q: (N, D), k: (M, D), targets: (N,) int64; z = scale · q̂ k̂ᵀ.

    Returns (row_loss (N,), col_loss (N,) or (0,), row_lse (N,), col_lse (M,) or (0,)), all in the
    accumulation dtype. With ``symmetric`` the column log-sum-exps are merged online across row
    blocks, so one pass over z serves both directions.
    """
    acc = accumulation_dtype(q, k)
    qn, _ = _prepare(q, normalize, acc)
    kn, _ = _prepare(k, normalize, acc)
    n, m = qn.shape[0], kn.shape[0]
    row_lse = qn.new_empty(n)
    row_loss = qn.new_empty(n)
    col_max = qn.new_full((m if symmetric else 0,), float("-inf"))
    col_sum = qn.new_zeros(m if symmetric else 0)
    block = row_block(m)
    for start in range(0, n, block):
        stop = min(start + block, n)
        z = torch.mm(qn[start:stop], kn.T).mul_(scale)
        lse = torch.logsumexp(z, dim=1)
        row_lse[start:stop] = lse
        row_loss[start:stop] = lse - z.gather(1, targets[start:stop, None]).squeeze(1)
        if symmetric:
            new_max = torch.maximum(col_max, z.amax(dim=0))
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(z - new_max).sum(dim=0)
            col_max = new_max
    if not symmetric:
        return row_loss, qn.new_empty(0), row_lse, qn.new_empty(0)
    col_lse = col_max + torch.log(col_sum)
    diagonal = (qn * kn[:n]).sum(dim=1).mul_(scale)
    return row_loss, col_lse - diagonal, row_lse, col_lse


def contrastive_backward(
    grad_row, grad_col, q, k, targets, row_lse, col_lse,
    scale: float, normalize: bool, symmetric: bool, need_q: bool, need_k: bool,
):
    """Gradients of Σ_i grad_row_i·row_loss_i (+ Σ_j grad_col_j·col_loss_j) by recomputing z.

    dz_ij = g_i (p_ij − [j = t_i]) + g'_j (p'_ij − [i = j]) with p = softmax over j, p' over i;
    dq̂ = scale · dz k̂, dk̂ = scale · dzᵀ q̂: 6·N·M·D FLOPs with both. Returns (dq, dk) in the
    inputs' dtypes, or an empty (0,) tensor for an input that needs no gradient.
    """
    acc = accumulation_dtype(q, k)
    qn, q_norms = _prepare(q, normalize, acc)
    kn, k_norms = _prepare(k, normalize, acc)
    n, m = qn.shape[0], kn.shape[0]
    grad_row = grad_row.to(acc)
    grad_col = grad_col.to(acc) if symmetric else None
    dqn = torch.empty_like(qn) if need_q else None
    dkn = torch.zeros_like(kn) if need_k else None
    block = row_block(m)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = torch.arange(start, stop, device=qn.device)
        g = grad_row[start:stop]
        z = torch.mm(qn[start:stop], kn.T).mul_(scale)
        if symmetric:
            dz_cols = (z - col_lse).exp_().mul_(grad_col)
            dz_cols[rows - start, rows] -= grad_col[start:stop]
        dz = z.sub_(row_lse[start:stop, None]).exp_().mul_(g[:, None])
        dz[rows - start, targets[start:stop]] -= g
        if symmetric:
            dz += dz_cols
        dz.mul_(scale)
        if need_q:
            torch.mm(dz, kn, out=dqn[start:stop])
        if need_k:
            dkn.addmm_(dz.T, qn[start:stop])
    dq = _to_input_grad(normalize_backward(dqn, qn, q_norms), q) if need_q else q.new_empty(0)
    dk = _to_input_grad(normalize_backward(dkn, kn, k_norms), k) if need_k else k.new_empty(0)
    return dq, dk


def contrastive_forward_with_grad(q, k, targets, scale: float, normalize: bool, need_q: bool, need_k: bool):
    """The summed loss Σ_i ℓ_i and its gradients, in one pass over z (one direction only).

    For a caller that will backpropagate a mean or sum (DESIGN §5, as Liger-Kernel's fused linear
    cross-entropy): each row block's probabilities serve dq and dk while they are in cache, so
    forward + backward cost 2 + 2 per gradient N·M·D FLOPs instead of the recompute's 4 + 2 per
    gradient, and the backward is a scale of the stored gradients. Returns (loss_sum (), dq, dk) in
    the accumulation dtype, (0,) for an input that needs no gradient.
    """
    acc = accumulation_dtype(q, k)
    qn, q_norms = _prepare(q, normalize, acc)
    kn, k_norms = _prepare(k, normalize, acc)
    n = qn.shape[0]
    loss_sum = qn.new_zeros(())
    dqn = torch.empty_like(qn) if need_q else None
    dkn = torch.zeros_like(kn) if need_k else None
    block = row_block(kn.shape[0])
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = torch.arange(stop - start, device=qn.device)
        z = torch.mm(qn[start:stop], kn.T).mul_(scale)
        row_max = z.amax(dim=1, keepdim=True)
        target_logit = z[rows, targets[start:stop]]
        p = z.sub_(row_max).exp_()
        row_sum = p.sum(dim=1, keepdim=True)
        loss_sum += (row_max + row_sum.log()).sum() - target_logit.sum()
        p.div_(row_sum)
        p[rows, targets[start:stop]] -= 1
        p.mul_(scale)
        if need_q:
            torch.mm(p, kn, out=dqn[start:stop])
        if need_k:
            dkn.addmm_(p.T, qn[start:stop])
    dq = normalize_backward(dqn, qn, q_norms) if need_q else qn.new_empty(0)
    dk = normalize_backward(dkn, kn, k_norms) if need_k else kn.new_empty(0)
    return loss_sum, dq, dk


# --------------------------------------------------------------------------------------------------
# Structure loss, tile algorithm (DESIGN §1.2): rows [row_start, row_start + row_count) of the N×N
# similarity matrices, against all N columns, the diagonal (i, i) left out.
# --------------------------------------------------------------------------------------------------


def structure_tile_forward(s, t, kind: str, scale: float, normalize: bool, row_start: int, row_count: int):
    """s: (N, Ds), t: (N, Dt). Returns the (row_count,) per-row losses (reference.structure_rows)."""
    acc = accumulation_dtype(s, t)
    x, _ = _prepare(s, normalize, acc)
    y, _ = _prepare(t, normalize, acc)
    n = x.shape[0]
    out = x.new_empty(row_count)
    block = row_block(n)
    for start in range(row_start, row_start + row_count, block):
        stop = min(start + block, row_start + row_count)
        tile = _Tile(x, y, start, stop)
        out[start - row_start : stop - row_start] = tile.loss(kind, scale)
    return out


def structure_tile_backward(
    grad, row_loss, s, t, kind: str, scale: float, normalize: bool,
    row_start: int, row_count: int, need_s: bool, need_t: bool,
):
    """Gradients of Σ_i grad_i·row_loss_i for the rows computed by ``structure_tile_forward``.

    Each block's dG^S, dG^T reach both the rows (dG x) and the columns (dGᵀ x_block), since
    G = x xᵀ. Returns (ds, dt) in the inputs' dtypes, (0,) where no gradient is needed.
    """
    acc = accumulation_dtype(s, t)
    x, s_norms = _prepare(s, normalize, acc)
    y, t_norms = _prepare(t, normalize, acc)
    grad, row_loss = grad.to(acc), row_loss.to(acc)
    n = x.shape[0]
    dx = torch.zeros_like(x) if need_s else None
    dy = torch.zeros_like(y) if need_t else None
    block = row_block(n)
    for start in range(row_start, row_start + row_count, block):
        stop = min(start + block, row_start + row_count)
        local = slice(start - row_start, stop - row_start)
        tile = _Tile(x, y, start, stop)
        dgs, dgt = tile.loss_backward(kind, scale, grad[local], row_loss[local])
        if need_s:
            dx[start:stop] += dgs @ x
            dx.addmm_(dgs.T, x[start:stop])
        if need_t:
            dy[start:stop] += dgt @ y
            dy.addmm_(dgt.T, y[start:stop])
    ds = _to_input_grad(normalize_backward(dx, x, s_norms), s) if need_s else s.new_empty(0)
    dt = _to_input_grad(normalize_backward(dy, y, t_norms), t) if need_t else t.new_empty(0)
    return ds, dt


# --------------------------------------------------------------------------------------------------
# Structure loss, gram algorithm: normalization here, the D×D algebra in gram.py.
# --------------------------------------------------------------------------------------------------


def structure_gram_forward(s, t, kind: str, normalize: bool):
    """s: (N, Ds), t: (N, Dt). Per-row losses (N,) of "mse" or "pearson" by the gram algorithm."""
    acc = accumulation_dtype(s, t)
    x, _ = normalize_forward(s.to(acc), normalize)
    y, _ = normalize_forward(t.to(acc), normalize)
    return gram.gram_forward(x, y, kind, x.shape[0])


def structure_gram_backward(grad, row_loss, s, t, kind: str, normalize: bool, need_s: bool, need_t: bool):
    """Gradients (ds, dt) of Σ_i grad_i·row_loss_i; (0,) where no gradient is needed."""
    acc = accumulation_dtype(s, t)
    x, s_norms = normalize_forward(s.to(acc), normalize)
    y, t_norms = normalize_forward(t.to(acc), normalize)
    dx, dy = gram.gram_backward(grad.to(acc), x, y, kind, x.shape[0], need_s, need_t)
    ds = normalize_backward(dx, x, s_norms).to(s.dtype).contiguous() if need_s else s.new_empty(0)
    dt = normalize_backward(dy, y, t_norms).to(t.dtype).contiguous() if need_t else t.new_empty(0)
    return ds, dt


class _Tile:
    """Rows start..stop of both similarity matrices, with the per-row math of each kind.

    Every row is whole here (block × N), so per-row statistics come from the tile itself; the
    backward recomputes the tile instead of saving it.
    """

    def __init__(self, x, y, start, stop):
        self.gs = torch.mm(x[start:stop], x.T)
        self.gt = torch.mm(y[start:stop], y.T)
        self.rows = torch.arange(stop - start, device=x.device)
        self.diag = self.rows + start
        self.n_other = x.shape[0] - 1

    def _zero_diagonal(self, g):
        g[self.rows, self.diag] = 0
        return g

    def _centered(self):
        """Rows minus their mean over j ≠ i, diagonal zeroed (two passes: no cancellation)."""
        centered = []
        for g in (self.gs, self.gt):
            mean = (g.sum(dim=1) - g[self.rows, self.diag]) / self.n_other
            centered.append(self._zero_diagonal(g.sub_(mean[:, None])))
        return centered

    def _kl_logs(self, scale):
        """log P (teacher) and log Q (student) over j ≠ i; the diagonal is −inf in both."""
        minus_inf = float("-inf")
        a = self.gt.mul_(scale)
        b = self.gs.mul_(scale)
        a[self.rows, self.diag] = minus_inf
        b[self.rows, self.diag] = minus_inf
        log_p = a.sub_(torch.logsumexp(a, dim=1, keepdim=True))
        log_q = b.sub_(torch.logsumexp(b, dim=1, keepdim=True))
        return log_p, log_q

    def _kl_terms(self, log_p, log_q):
        """P (log P − log Q) with the diagonal zeroed (0·(−inf + inf) would be NaN)."""
        ratio = self._zero_diagonal(log_p - log_q)
        return log_p.exp() * ratio, ratio

    def loss(self, kind, scale):
        if kind == "mse":
            return self._zero_diagonal(self.gs.sub_(self.gt)).pow_(2).sum(dim=1) / self.n_other
        if kind == "pearson":
            cs, ct = self._centered()
            r = (cs * ct).sum(dim=1) / (cs.pow(2).sum(dim=1) * ct.pow(2).sum(dim=1)).clamp_min(EPS**2).sqrt()
            return 1 - r
        log_p, log_q = self._kl_logs(scale)
        terms, _ = self._kl_terms(log_p, log_q)
        return terms.sum(dim=1)

    def loss_backward(self, kind, scale, grad, row_loss):
        """(dG^S, dG^T) for the block's rows, each (block × N), diagonal zero."""
        if kind == "mse":
            dgs = self._zero_diagonal(self.gs.sub_(self.gt)).mul_((2 * grad / self.n_other)[:, None])
            return dgs, -dgs
        if kind == "pearson":
            cs, ct = self._centered()
            var_s, var_t = cs.pow(2).sum(dim=1), ct.pow(2).sum(dim=1)
            product = var_s * var_t
            unclamped = product > EPS**2
            g_r = -grad  # loss_i = 1 − r_i
            r = 1 - row_loss
            inv_d = g_r / product.clamp_min(EPS**2).sqrt()
            zero = torch.zeros_like(r)
            coef_s = torch.where(unclamped, g_r * r / var_s, zero)
            coef_t = torch.where(unclamped, g_r * r / var_t, zero)
            dgs = ct * inv_d[:, None] - cs * coef_s[:, None]
            dgt = cs * inv_d[:, None] - ct * coef_t[:, None]
            return dgs, dgt
        log_p, log_q = self._kl_logs(scale)
        terms, ratio = self._kl_terms(log_p, log_q)
        p = log_p.exp_()
        g = (grad * scale)[:, None]
        dgs = self._zero_diagonal(log_q.exp_().sub_(p)).mul_(g)
        dgt = terms.sub_(p * row_loss[:, None]).mul_(g)
        return dgs, dgt
