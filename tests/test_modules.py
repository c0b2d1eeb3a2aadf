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


def test_a_copy_of_a_module_across_ranks_shares_its_group(tmp_path):
    """An EMA or teacher copy of a model deep-copies its loss module: the process group, which
    cannot be copied (it raised "cannot pickle ProcessGroup"), is shared; the rest is copied."""
    import copy

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        for crit in (mk.ContrastiveLoss(temperature=0.1, process_group=group),
                     mk.StructureLoss(kind="mse", process_group=group)):
            twin = torch.nn.Sequential(torch.nn.Linear(8, 8), crit)
            copied = copy.deepcopy(twin)
            assert copied[1].process_group is group and copied[1] is not crit
            assert copied[0].weight is not twin[0].weight and torch.equal(copied[0].weight, twin[0].weight)
            q, k = randn(6, 8, seed=2), randn(6, 8, seed=3)
            assert torch.equal(copied[1](q, k), crit(q, k))
    finally:
        dist.destroy_process_group()
