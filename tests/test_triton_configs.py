"""The Triton kernels' code paths that only some autotune configs take, each run and checked.

The shared tables run one config per kernel (the interpreter's, or whichever the autotuner picks
on a GPU). The fused forward with gradients keeps 1, 2 or 3 accumulator chunks per program
(``CHUNKS``, a constexpr that changes the code); here each count runs, with chunks narrower than
D so that spans end mid-chunk and past D, against the float64 chunked backend. Small blocks keep
the interpreter fast; on a GPU the same configs run compiled.
"""

import pytest
import torch
import triton

from mmkd_test_support import TOLERANCE, rel_err
from mmkd_kernels import chunked
from mmkd_kernels.triton import contrastive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("need_k", [False, True])
def test_fused_forward_with_grad_for_each_chunk_count(monkeypatch, chunks, dtype, need_k):
    config = triton.Config(dict(BLOCK_A=32, BLOCK_B=32, BLOCK_D=32, BLOCK_DO=16, CHUNKS=chunks), num_warps=4,
                           num_stages=2)
    monkeypatch.setattr(contrastive._lse_grad_kernel, "configs", [config])
    if hasattr(contrastive._lse_grad_kernel, "configs_by_dtype"):
        monkeypatch.setattr(contrastive._lse_grad_kernel, "configs_by_dtype", dict(half=[config], float32=[config]))
    generator = torch.Generator().manual_seed(chunks)
    n, m, d = 45, 77, 70  # 70 = 4 chunks of 16 and a part: spans of 1, 2, 3 chunks all end inside D or past it
    q = torch.randn(n, d, generator=generator).to(DEVICE, dtype)
    k = torch.randn(m, d, generator=generator).to(DEVICE, dtype)
    targets = torch.randint(0, m, (n,), generator=generator).to(DEVICE)
    loss, dq, dk = contrastive.contrastive_forward_with_grad(q, k, targets, 20.0, True, True, need_k)
    want = chunked.contrastive_forward_with_grad(q.cpu().double(), k.cpu().double(), targets.cpu(), 20.0, True,
                                                 True, need_k)
    tol = TOLERANCE[dtype]
    assert rel_err(loss.cpu(), want[0]) < tol
    assert rel_err(dq.cpu(), want[1]) < tol
    if need_k:
        assert rel_err(dk.cpu(), want[2]) < tol
    else:
        assert dk.numel() == 0
