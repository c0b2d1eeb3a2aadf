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


def target_loss(shifted_target, target_weight, other_sum):
    """ℓ = log(a + b) − log a from a = exp(z_t − m) (``target_weight``), b = Σ_{j≠t} exp(z_j − m)
    (``other_sum``, summed without the target) and z_t − m (``shifted_target``): log1p(b / a) while
    the target dominates, so a nearly aligned pair's small loss keeps its digits (lse − z_t would
    cancel them), log(a + b) − (z_t − m) otherwise (b / a may overflow there)."""
    dominant = target_weight >= other_sum
    ratio = other_sum / torch.where(dominant, target_weight, torch.ones_like(target_weight))
    return torch.where(dominant, torch.log1p(ratio), torch.log(target_weight + other_sum) - shifted_target)


def _row_statistics(z, targets):
    """z: (b, M) logits, targets: (b,). Returns (lse (b,), loss (b,), e (b, M), other (b,),
    denominator (b,)): e = exp(z − rowmax) with its target entries zeroed (the softmax numerators of
    the other columns), other = Σ_{j≠t} e_j, denominator = Σ_j exp(z_j − rowmax)."""
    rows = torch.arange(z.shape[0], device=z.device)
    row_max = z.amax(dim=1)
    shifted_target = z[rows, targets] - row_max
    e = torch.exp(z - row_max[:, None])
    e[rows, targets] = 0
    other = e.sum(dim=1)
    target_weight = torch.exp(shifted_target)
    denominator = target_weight + other
    loss = target_loss(shifted_target, target_weight, other)
    return row_max + torch.log(denominator), loss, e, other, denominator


def _check_targets(targets, m: int) -> None:
    """Targets index z's columns, where −1 would wrap to the last one: an op called directly with
    one outside [0, M) fails (the public losses check theirs before). An assert in the stream, so that
    a GPU is not stopped to read the values."""
    torch._assert_async(((targets >= 0) & (targets < m)).all(), f"targets must lie in [0, {m}) (teacher rows)")


def contrastive_forward(q, k, targets, scale: float, normalize: bool, symmetric: bool):
    """q: (N, D), k: (M, D), targets: (N,) int64; z = scale · q̂ k̂ᵀ.

    Returns (row_loss (N,), col_loss (N,) or (0,), row_lse (N,), col_lse (M,) or (0,)), all in the
    accumulation dtype. With ``symmetric`` the column statistics are merged online across row
    blocks, so one pass over z serves both directions; column j's positive is row j.
    """
    _check_targets(targets, k.shape[0])
    acc = accumulation_dtype(q, k)
    qn, _ = _prepare(q, normalize, acc)
    kn, _ = _prepare(k, normalize, acc)
    n, m = qn.shape[0], kn.shape[0]
    row_lse = qn.new_empty(n)
    row_loss = qn.new_empty(n)
    col_max = qn.new_full((m if symmetric else 0,), float("-inf"))
    col_other = qn.new_zeros(m if symmetric else 0)  # Σ_{i≠j} exp(z_ij − col_max_j)
    diagonal = qn.new_empty(n if symmetric else 0)
    block = row_block(m)
    for start in range(0, n, block):
        stop = min(start + block, n)
        z = torch.mm(qn[start:stop], kn.T).mul_(scale)
        row_lse[start:stop], row_loss[start:stop], _, _, _ = _row_statistics(z, targets[start:stop])
        if symmetric:
            rows = torch.arange(stop - start, device=z.device)
            diagonal[start:stop] = z[rows, rows + start]
            new_max = torch.maximum(col_max, z.amax(dim=0))
            e = z.sub_(new_max).exp_()
            e[rows, rows + start] = 0
            col_other = col_other * torch.exp(col_max - new_max) + e.sum(dim=0)
            col_max = new_max
    if not symmetric:
        return row_loss, qn.new_empty(0), row_lse, qn.new_empty(0)
    shifted_diagonal = diagonal - col_max  # symmetric: M == N
    diagonal_weight = torch.exp(shifted_diagonal)
    col_lse = col_max + torch.log(diagonal_weight + col_other)
    return row_loss, target_loss(shifted_diagonal, diagonal_weight, col_other), row_lse, col_lse


def contrastive_backward(
    grad_row, grad_col, q, k, targets, row_lse, col_lse, row_loss, col_loss,
    scale: float, normalize: bool, symmetric: bool, need_q: bool, need_k: bool,
):
    """Gradients of Σ_i grad_row_i·row_loss_i (+ Σ_j grad_col_j·col_loss_j) by recomputing z.

    dz_ij = g_i (p_ij − [j = t_i]) + g'_j (p'_ij − [i = j]) with p = softmax over j, p' over i;
    the target's p − 1 is taken as expm1(−ℓ), exact where p is within rounding of 1.
    dq̂ = scale · dz k̂, dk̂ = scale · dzᵀ q̂: 6·N·M·D FLOPs with both. Returns (dq, dk) in the
    inputs' dtypes, or an empty (0,) tensor for an input that needs no gradient.
    """
    _check_targets(targets, k.shape[0])
    acc = accumulation_dtype(q, k)
    qn, q_norms = _prepare(q, normalize, acc)
    kn, k_norms = _prepare(k, normalize, acc)
    n, m = qn.shape[0], kn.shape[0]
    grad_row = grad_row.to(acc)
    grad_col = grad_col.to(acc) if symmetric else None
    target_grad = torch.expm1(-row_loss) * grad_row
    diagonal_grad = torch.expm1(-col_loss) * grad_col if symmetric else None
    dqn = torch.empty_like(qn) if need_q else None
    dkn = torch.zeros_like(kn) if need_k else None
    block = row_block(m)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = torch.arange(stop - start, device=qn.device)
        z = torch.mm(qn[start:stop], kn.T).mul_(scale)
        if symmetric:
            dz_cols = (z - col_lse).exp_().mul_(grad_col)
            dz_cols[rows, rows + start] = diagonal_grad[start:stop]
        dz = z.sub_(row_lse[start:stop, None]).exp_().mul_(grad_row[start:stop, None])
        dz[rows, targets[start:stop]] = target_grad[start:stop]
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
    gradient, and the backward is a scale of the stored gradients. The target's p − 1 is
    −Σ_{j≠t} p_j, summed without the target. Returns (loss_sum (), dq, dk) in the accumulation
    dtype, (0,) for an input that needs no gradient.
    """
    _check_targets(targets, k.shape[0])
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
        block_targets = targets[start:stop]
        z = torch.mm(qn[start:stop], kn.T).mul_(scale)
        _, loss, p, other, denominator = _row_statistics(z, block_targets)
        loss_sum += loss.sum()
        p.div_(denominator[:, None])
        p[rows, block_targets] = -other / denominator
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


def _tile_pass(s, t, kind, scale, normalize, row_start, row_count, grad, need_s, need_t):
    """One pass over the row blocks: per-row losses (row_count,), and with ``grad`` (row_count,)
    the gradients of Σ_i grad_i·loss_i in the accumulation dtype (None where not needed).

    Each block's dG^S, dG^T reach both its rows (dG x) and all columns (dGᵀ x_block): G = x xᵀ.
    """
    acc = accumulation_dtype(s, t)
    x, s_norms = _prepare(s, normalize, acc)
    y, t_norms = _prepare(t, normalize, acc)
    losses = x.new_empty(row_count)
    dx = torch.zeros_like(x) if grad is not None and need_s else None
    dy = torch.zeros_like(y) if grad is not None and need_t else None
    for start in range(row_start, row_start + row_count, row_block(x.shape[0])):
        stop = min(start + row_block(x.shape[0]), row_start + row_count)
        local = slice(start - row_start, stop - row_start)
        tile = _Tile(x, y, start, stop, kl_centred=normalize and abs(scale) <= KL_CENTRED_MAX_SCALE)
        if grad is None:
            losses[local] = tile.loss(kind, scale)
            continue
        losses[local], dgs, dgt = tile.loss_and_grads(kind, scale, grad[local].to(acc))
        if dx is not None:
            dx[start:stop] += dgs @ x
            dx.addmm_(dgs.T, x[start:stop])
        if dy is not None:
            dy[start:stop] += dgt @ y
            dy.addmm_(dgt.T, y[start:stop])
    dx = normalize_backward(dx, x, s_norms) if dx is not None else None
    dy = normalize_backward(dy, y, t_norms) if dy is not None else None
    return losses, dx, dy


def structure_tile_forward(s, t, kind: str, scale: float, normalize: bool, row_start: int, row_count: int):
    """s: (N, Ds), t: (N, Dt). The per-row losses (row_count,) of rows row_start.. against all N
    columns, as reference.structure_rows, in the accumulation dtype."""
    losses, _, _ = _tile_pass(s, t, kind, scale, normalize, row_start, row_count, None, False, False)
    return losses


def structure_tile_forward_with_grad(s, t, kind: str, scale: float, normalize: bool, row_start: int,
                                     row_count: int, need_s: bool, need_t: bool):
    """The summed loss over the rows and its gradients in one pass (the structure loss is a mean,
    so its row gradients are uniform). Returns (loss_sum (), ds, dt) in the accumulation dtype."""
    ones = s.new_ones(row_count, dtype=accumulation_dtype(s, t))
    losses, dx, dy = _tile_pass(s, t, kind, scale, normalize, row_start, row_count, ones, need_s, need_t)
    return losses.sum(), dx if need_s else losses.new_empty(0), dy if need_t else losses.new_empty(0)


# --------------------------------------------------------------------------------------------------
# Structure loss, gram algorithm: gram.py, which also normalizes the rows, block by block.
# --------------------------------------------------------------------------------------------------


def structure_gram_forward(s, t, kind: str, normalize: bool):
    """s: (N, Ds), t: (N, Dt). Per-row losses (N,) of "mse" or "pearson" by the gram algorithm."""
    return gram.gram_forward(s, t, kind, s.shape[0], normalize)


def structure_gram_forward_with_grad(s, t, kind: str, normalize: bool, need_s: bool, need_t: bool):
    """The summed loss and its gradients, sharing the D×D statistics. (loss_sum (), ds, dt), acc dtype."""
    ones = s.new_ones(s.shape[0], dtype=accumulation_dtype(s, t))
    losses, ds, dt = gram.gram_backward(ones, s, t, kind, s.shape[0], normalize, need_s, need_t)
    return losses.sum(), ds if need_s else losses.new_empty(0), dt if need_t else losses.new_empty(0)


# The centred form of the KL needs e^x finite for every x = d − μ; with cosine similarities
# |x| ≤ 4|scale|, and e^80 is a normal float32.
KL_CENTRED_MAX_SCALE = 20.0


class _Tile:
    """Rows start..stop of both similarity matrices (block × N), with the per-row math of each kind.

    Every row is whole here, so per-row statistics come from the tile itself (two-pass, stable);
    backward recomputes the tile instead of saving it. ``kl_centred``: the rows are cosine
    similarities and |scale| ≤ KL_CENTRED_MAX_SCALE, so kl may take its centred form.
    """

    def __init__(self, x, y, start, stop, kl_centred=False):
        self.kl_centred = kl_centred
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

    def _pearson(self):
        cs, ct = self._centered()
        var_s, var_t = cs.pow(2).sum(dim=1), ct.pow(2).sum(dim=1)
        # max(√var_s·√var_t, eps): each root first, since var_s·var_t overflows float32 for variances
        # past 1.8e19 (unnormalized rows of 3e4) and the loss read 1 with no gradient.
        denom = var_s.sqrt() * var_t.sqrt()
        unclamped = denom > EPS
        denom = denom.clamp_min(EPS)
        return cs, ct, var_s, var_t, unclamped, (cs * ct).sum(dim=1) / denom, denom

    def _kl_logs(self, scale):
        """log P (teacher) and log Q (student) over j ≠ i; the diagonal is −inf in both."""
        a = self.gt.mul_(scale)
        b = self.gs.mul_(scale)
        a[self.rows, self.diag] = float("-inf")
        b[self.rows, self.diag] = float("-inf")
        log_p = a.sub_(torch.logsumexp(a, dim=1, keepdim=True))
        log_q = b.sub_(torch.logsumexp(b, dim=1, keepdim=True))
        terms = log_p.exp() * self._zero_diagonal(log_p - log_q)  # 0·(−inf + inf) would be NaN
        return log_p, log_q, terms

    def _kl_centred_terms(self, scale):
        """(p, x, kl): the teacher's softmax p over j ≠ i (a = scale·G^T), x = d − μ for the logits'
        difference d = b − a (b = scale·G^S) and μ = Σ_j p_j d_j, and the row's
            KL(P ‖ Q) = log Σ_j p_j e^{x_j} = log1p(Σ_j p_j (e^{x_j} − 1 − x_j)),
        a sum of terms ≥ 0. Σ_j p_j log(p_j / q_j) adds terms of both signs far larger than their
        sum when the student is close to its teacher (its float32 loss was off by 3e-5 at the
        accuracy table's aligned pairs, and by 1e-3 once the KL is about 1e-6); here each term
        keeps its digits. Diagonal: p = x = 0."""
        a = self.gt.mul_(scale)
        d = self.gs.mul_(scale).sub_(a)
        a[self.rows, self.diag] = float("-inf")
        p = torch.softmax(a, dim=1)
        mu = (p * self._zero_diagonal(d)).sum(dim=1, keepdim=True)
        x = self._zero_diagonal(d.sub_(mu))
        # expm1(x) − x rounds at about eps/|x| of each term (the native kernel's Taylor series does
        # better, in registers; here it would be ten passes over the tile). The terms are ≥ 0 and
        # their rounding random, so the sum keeps more, and the rounding of G's own float32 GEMMs
        # is as large: in float64 this sum measured no better (tests/test_structure.py holds the
        # result to float32's tolerance).
        spread = (p * torch.expm1(x).sub_(x)).sum(dim=1)
        return p, x, torch.log1p(spread)

    def loss(self, kind, scale):
        """Per-row losses (block,)."""
        if kind == "mse":
            return self._zero_diagonal(self.gs.sub_(self.gt)).pow_(2).sum(dim=1) / self.n_other
        if kind == "pearson":
            return 1 - self._pearson()[5]
        if self.kl_centred:
            return self._kl_centred_terms(scale)[2]
        return self._kl_logs(scale)[2].sum(dim=1)

    def loss_and_grads(self, kind, scale, grad):
        """Per-row losses and (dG^S, dG^T) of Σ_i grad_i·loss_i, each (block × N), diagonal zero."""
        if kind == "mse":
            diff = self._zero_diagonal(self.gs.sub_(self.gt))
            losses = diff.pow(2).sum(dim=1) / self.n_other
            dgs = diff.mul_((2 * grad / self.n_other)[:, None])
            return losses, dgs, -dgs
        if kind == "pearson":
            cs, ct, var_s, var_t, unclamped, r, denom = self._pearson()
            g_r = -grad  # loss_i = 1 − r_i
            zero = torch.zeros_like(r)
            inv_d = (g_r / denom)[:, None]
            coef_s = torch.where(unclamped, g_r * r / var_s, zero)[:, None]
            coef_t = torch.where(unclamped, g_r * r / var_t, zero)[:, None]
            return 1 - r, ct * inv_d - cs * coef_s, cs * inv_d - ct * coef_t
        g = (grad * scale)[:, None]
        if self.kl_centred:
            # q − p = p (e^{x − kl} − 1), and ∂kl/∂a_j = −p_j x_j: no difference of two near numbers.
            p, x, losses = self._kl_centred_terms(scale)
            return losses, p * torch.expm1(x - losses[:, None]) * g, (p * x).mul_(g).neg_()
        log_p, log_q, terms = self._kl_logs(scale)
        losses = terms.sum(dim=1)
        p = log_p.exp_()
        dgs = self._zero_diagonal(log_q.exp_().sub_(p)).mul_(g)
        dgt = terms.sub_(p * losses[:, None]).mul_(g)
        return losses, dgs, dgt
