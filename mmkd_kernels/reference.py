"""The losses in the words of the math (DESIGN §1): the ground truth every fast path is tested against.

Plain PyTorch with autograd. Every N×N similarity matrix is materialized, so this backend is for
checks and toy sizes only. Run it in float64 for ground truth; half-precision inputs are computed in
float32. Each function returns *per-row losses* whose mean over the rows is the loss, so that every
backend shares one reduction (``functional.py``).
"""

import functools

import torch

EPS = 1e-8


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype every reduction accumulates in."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def without_autocast(fn):
    """``fn`` (whose first argument is a tensor) run with autocast off on that tensor's device.

    The losses choose their own precision (the accumulation dtype; half inputs stay half where a
    kernel reads them). Under a model's bfloat16 autocast, plain PyTorch matmuls on float32 rows
    would run in bfloat16: chunked's contrastive loss came out 3.6% off, and its backward failed
    on an out= buffer of the wrong dtype.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args, **kwargs)

    return run


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x̂ = x / max(‖x‖, eps), row by row."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


@without_autocast
def contrastive_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    symmetric: bool,
    normalize: bool,
) -> torch.Tensor:
    """Per-row contrastive losses (DESIGN §1.1).

    q: (N, D) student, k: (M, D) teacher, targets: (N,) int64 in [0, M).
    Returns (N,) in the accumulation dtype: ℓ_i = logsumexp_j z_ij − z_{i,targets_i} with
    z = q̂ k̂ᵀ / τ; with ``symmetric`` (M == N, targets = arange(N)) it is ½(ℓ_i + ℓ'_i) where
    ℓ'_i = logsumexp_j z_ji − z_ii is the loss of column i.
    """
    acc = accumulation_dtype(q, k)
    q, k = q.to(acc), k.to(acc)
    if normalize:
        q, k = l2_normalize(q), l2_normalize(k)
    z = q @ k.T / temperature
    rows = torch.logsumexp(z, dim=1) - z.gather(1, targets[:, None]).squeeze(1)
    if not symmetric:
        return rows
    cols = torch.logsumexp(z, dim=0) - z.diagonal()
    return (rows + cols) / 2


def _off_diagonal(g: torch.Tensor) -> torch.Tensor:
    """(N, N) -> (N, N-1): row i without its entry (i, i)."""
    n = g.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=g.device)
    return g[keep].view(n, n - 1)


@without_autocast
def structure_rows(
    s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float, normalize: bool
) -> torch.Tensor:
    """Per-row structure losses (DESIGN §1.2); their mean is the loss.

    s: (N, Ds) student, t: (N, Dt) teacher. G^S = ŝŝᵀ, G^T = t̂t̂ᵀ, each row taken over j ≠ i.
    - "mse":     Σ_{j≠i} (G^S_ij − G^T_ij)² / (N − 1)
    - "pearson": 1 − r_i, r_i the correlation of row i of G^S with row i of G^T
    - "kl":      KL(softmax(G^T_i / τ) ‖ softmax(G^S_i / τ))
    """
    acc = accumulation_dtype(s, t)
    s, t = s.to(acc), t.to(acc)
    if normalize:
        s, t = l2_normalize(s), l2_normalize(t)
    gs, gt = _off_diagonal(s @ s.T), _off_diagonal(t @ t.T)
    if kind == "mse":
        return (gs - gt).pow(2).sum(dim=1) / gs.shape[1]
    if kind == "pearson":
        cs = gs - gs.mean(dim=1, keepdim=True)
        ct = gt - gt.mean(dim=1, keepdim=True)
        cov = (cs * ct).sum(dim=1)
        var_s, var_t = cs.pow(2).sum(dim=1), ct.pow(2).sum(dim=1)
        # sqrt(max(v, eps²)) = max(sqrt(v), eps), without sqrt's infinite slope at 0; the product in
        # float64, where float32's would overflow (variances past 1.8e19: unnormalized rows of 3e4).
        r = cov / (var_s.double() * var_t.double()).clamp_min(EPS**2).sqrt().to(cov.dtype)
        return 1 - r
    if kind == "kl":
        log_p = torch.log_softmax(gt / temperature, dim=1)
        log_q = torch.log_softmax(gs / temperature, dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)
    raise ValueError(f"kind must be 'mse', 'pearson' or 'kl', got {kind!r}")

