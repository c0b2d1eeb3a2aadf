"""Row-wise L2 normalization with its exact backward, for the hand-written backends.

x̂ = x / max(‖x‖, eps). Backward: dx = (dx̂ − x̂ (x̂·dx̂)) / ‖x‖ where ‖x‖ > eps, else dx̂ / eps.
"""

import torch

from .reference import EPS


def normalize_forward(x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: (N, D) in the accumulation dtype. Returns (x̂, clamped norms (N,)) or (x, None)."""
    if not normalize:
        return x, None
    norms = torch.linalg.vector_norm(x, dim=1).clamp_min_(EPS)
    return x / norms[:, None], norms


def normalize_backward(dx_hat: torch.Tensor, x_hat: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """Gradient with respect to x from the gradient with respect to x̂ (in place on dx_hat)."""
    if norms is None:
        return dx_hat
    radial = (x_hat * dx_hat).sum(dim=1) * (norms > EPS).to(x_hat.dtype)
    return dx_hat.sub_(x_hat * radial[:, None]).div_(norms[:, None])
