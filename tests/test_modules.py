"""The nn.Module wrappers call the functional losses with their stored arguments."""

import torch

import mmkd_kernels as mk
from mmkd_test_support import randn


def test_modules_equal_functional():
    q, k = randn(12, 8, seed=0), randn(12, 8, seed=1)
    targets = torch.randint(0, 12, (12,), generator=torch.Generator().manual_seed(0))
    crit = mk.ContrastiveLoss(temperature=0.1, backend="chunked")
    assert torch.equal(crit(q, k, targets), mk.contrastive_loss(q, k, temperature=0.1, targets=targets, backend="chunked"))
    sym = mk.ContrastiveLoss(symmetric=True, reduction="none")
    assert torch.equal(sym(q, k), mk.contrastive_loss(q, k, symmetric=True, reduction="none"))
    struct = mk.StructureLoss(kind="kl", temperature=0.5, backend="chunked")
    assert torch.equal(struct(q, k), mk.structure_loss(q, k, kind="kl", temperature=0.5, backend="chunked"))
    assert repr(crit) == ("ContrastiveLoss(temperature=0.1, symmetric=False, normalize=True, reduction='mean', "
                          "backend='chunked')")
    assert repr(struct) == "StructureLoss(kind='kl', temperature=0.5, normalize=True, algorithm='auto', backend='chunked')"
