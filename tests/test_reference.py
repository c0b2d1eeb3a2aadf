"""The reference backend against independent oracles: it is the ground truth of every other test."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmkd_kernels as mk
from mmkd_test_support import leaf, randn


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (17, 17, 7), (33, 50, 64)])
def test_contrastive_is_cross_entropy_on_scaled_cosines(seed, n, m, d):
    """MultipleNegativesRankingLoss with scale = 1/τ: cross_entropy(cos_sim · scale, targets)."""
    q, k = randn(n, d, seed=seed, dtype=torch.float64), randn(m, d, seed=seed + 1, dtype=torch.float64)
    targets = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(seed))
    logits = F.cosine_similarity(q[:, None, :], k[None, :, :], dim=-1, eps=1e-8) * 20.0
    expected = F.cross_entropy(logits, targets)
    got = mk.contrastive_loss(q, k, targets=targets, temperature=0.05, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if n == m:
        sym = (F.cross_entropy(logits, torch.arange(n)) + F.cross_entropy(logits.T, torch.arange(n))) / 2
        got = mk.contrastive_loss(q, k, temperature=0.05, symmetric=True, backend="reference")
        torch.testing.assert_close(got, sym, rtol=1e-12, atol=1e-12)
    none = mk.contrastive_loss(q, k, targets=targets, temperature=0.05, reduction="none", backend="reference")
    torch.testing.assert_close(none, F.cross_entropy(logits, targets, reduction="none"), rtol=1e-12, atol=1e-12)


def _similarities(x):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


@pytest.mark.parametrize("seed", [0, 1])
def test_structure_kinds_against_numpy(seed):
    """Row by row with numpy: corrcoef for pearson, explicit softmaxes for kl, plain means for mse."""
    s, t = randn(23, 9, seed=seed, dtype=torch.float64), randn(23, 5, seed=seed + 1, dtype=torch.float64)
    gs, gt = _similarities(s.numpy()), _similarities(t.numpy())
    n, tau = gs.shape[0], 0.3
    rows = [np.delete(np.arange(n), i) for i in range(n)]
    r = np.mean([np.corrcoef(gs[i, j], gt[i, j])[0, 1] for i, j in enumerate(rows)])
    mse = np.mean([np.mean((gs[i, j] - gt[i, j]) ** 2) for i, j in enumerate(rows)])

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    kl = np.mean([np.sum(softmax(gt[i, j] / tau) * np.log(softmax(gt[i, j] / tau) / softmax(gs[i, j] / tau)))
                  for i, j in enumerate(rows)])
    for kind, expected in (("pearson", 1 - r), ("mse", mse), ("kl", kl)):
        got = mk.structure_loss(s, t, kind=kind, temperature=tau, backend="reference").item()
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12), kind


def test_reference_gradcheck_float64():
    q, k = leaf(randn(4, 3, seed=3, dtype=torch.float64)), leaf(randn(6, 3, seed=4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: mk.contrastive_loss(a, b, temperature=0.5, backend="reference"), (q, k))
    s, t = leaf(randn(5, 3, seed=5, dtype=torch.float64)), leaf(randn(5, 2, seed=6, dtype=torch.float64))
    for kind in ("pearson", "mse", "kl"):
        assert torch.autograd.gradcheck(lambda a, b: mk.structure_loss(a, b, kind=kind, backend="reference"), (s, t))


def test_structure_is_zero_when_student_equals_teacher():
    s = randn(31, 12, seed=7, dtype=torch.float64)
    for kind in ("pearson", "mse", "kl"):
        assert abs(mk.structure_loss(s, s * 3.0, kind=kind, backend="reference").item()) < 1e-12, kind
