"""The Triton kernels' code paths that only some autotune configs take, each run and checked.

The shared tables run one config per kernel (the interpreter's, or whichever the autotuner picks
on a GPU). The gradient kernels keep 1, 2 or 3 accumulator chunks per program (``CHUNKS``, a
constexpr that changes the code); here each count runs, with chunks narrower than D so that spans
end mid-chunk and past D, against the float64 chunked backend. Small blocks keep the interpreter
fast; on a GPU the same configs run compiled.
"""

import pytest
import torch
import triton

from mmkd_test_support import TOLERANCE, rel_err
from mmkd_kernels import chunked
from mmkd_kernels.triton import contrastive, structure

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, M, D = 45, 77, 70  # 70 = 4 chunks of 16 and a part: spans of 1, 2 and 3 chunks end inside D or past it


def _only(monkeypatch, kernel, config):
    monkeypatch.setattr(kernel, "configs", [config])
    if hasattr(kernel, "configs_by_dtype"):  # compiled (GPU): the dtype prune picks from these
        monkeypatch.setattr(kernel, "configs_by_dtype", dict(half=[config], float32=[config]))


def _chunked_config(chunks):
    return triton.Config(dict(BLOCK_A=32, BLOCK_B=32, BLOCK_D=32, BLOCK_DO=16, CHUNKS=chunks), num_warps=4,
                         num_stages=2)


def _inputs(seed, dtype, n=N, m=M):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, D, generator=generator).to(DEVICE, dtype)
    k = torch.randn(m, D, generator=generator).to(DEVICE, dtype)
    return q, k, generator


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("need_k", [False, True])
def test_forward_with_grad_for_each_chunk_count(monkeypatch, chunks, dtype, need_k):
    for kernel in (contrastive._lse_grad_kernel, contrastive._grad_kernel):
        _only(monkeypatch, kernel, _chunked_config(chunks))
    q, k, generator = _inputs(chunks, dtype)
    targets = torch.randint(0, M, (N,), generator=generator).to(DEVICE)
    loss, dq, dk = contrastive.contrastive_forward_with_grad(q, k, targets, 20.0, True, True, need_k)
    want = chunked.contrastive_forward_with_grad(q.cpu().double(), k.cpu().double(), targets.cpu(), 20.0, True,
                                                 True, need_k)
    tol = TOLERANCE[dtype]
    assert rel_err(loss, want[0]) < tol
    assert rel_err(dq, want[1]) < tol
    if need_k:
        assert rel_err(dk, want[2]) < tol
    else:
        assert dk.numel() == 0


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_symmetric_backward_for_each_chunk_count(monkeypatch, chunks):
    """Both terms of the gradient kernel (rows' and columns' softmax) in every chunk count."""
    _only(monkeypatch, contrastive._grad_kernel, _chunked_config(chunks))
    q, k, generator = _inputs(10 + chunks, torch.float32, m=N)
    targets = torch.arange(N, device=DEVICE)
    grads = torch.rand(N, generator=generator).to(DEVICE), torch.rand(N, generator=generator).to(DEVICE)
    saved = contrastive.contrastive_forward(q, k, targets, 20.0, True, True)
    dq, dk = contrastive.contrastive_backward(*grads, q, k, targets, saved[2], saved[3], saved[0], saved[1],
                                              20.0, True, True, True, True)
    q64, k64 = q.cpu().double(), k.cpu().double()
    want_saved = chunked.contrastive_forward(q64, k64, targets.cpu(), 20.0, True, True)
    want = chunked.contrastive_backward(grads[0].cpu(), grads[1].cpu(), q64, k64, targets.cpu(), want_saved[2],
                                        want_saved[3], want_saved[0], want_saved[1], 20.0, True, True, True, True)
    assert rel_err(dq, want[0]) < TOLERANCE[torch.float32]
    assert rel_err(dk, want[1]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("kind", ["mse", "pearson", "kl"])
def test_structure_gradients_for_each_chunk_count(monkeypatch, chunks, kind):
    """The row and column gradient kernels of both sides, over a slice of rows (row_start > 0)."""
    for kernel in (structure._grad_rows_kernel, structure._grad_cols_kernel):
        _only(monkeypatch, kernel, _chunked_config(chunks))
    s, t, _ = _inputs(20 + chunks, torch.float32, m=N)
    got = structure.structure_tile_forward_with_grad(s, t, kind, 2.0, True, 5, 31, True, True)
    want = chunked.structure_tile_forward_with_grad(s.cpu().double(), t.cpu().double(), kind, 2.0, True, 5, 31,
                                                    True, True)
    for out, ref in zip(got, want):
        assert rel_err(out, ref) < TOLERANCE[torch.float32]
