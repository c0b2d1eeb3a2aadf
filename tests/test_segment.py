"""segment_mean: sub-word states -> word vectors."""

import pytest
import torch

import mmkd_kernels as mk
from mmkd_test_support import TOLERANCE, leaf, randn, rel_err


def _loop_mean(hidden, ids, num_segments):
    out = torch.zeros(num_segments, hidden.shape[-1], dtype=hidden.dtype)
    for w in range(num_segments):
        rows = hidden[ids == w]
        if len(rows):
            out[w] = rows.mean(dim=0)
    return out


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; none here")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_matches_a_plain_loop(seed, dtype, layout, device):
    """Against a float64 loop over the words: within DESIGN §4's tolerance of the dtype (means of
    half-precision rows are summed in float32 and rounded once)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = leaf(randn(53, 7, seed=seed, dtype=dtype, layout=layout, device=device))
    ids = torch.randint(-1, 20, (53,), generator=gen).to(device)  # -1: padding / special tokens
    out = mk.segment_mean(hidden, ids, num_segments=23)  # 20..22 are empty words
    assert out.dtype == dtype and out.device == hidden.device
    h64 = leaf(hidden.detach().double().cpu())
    want = _loop_mean_autograd(h64, ids.cpu(), 23)
    assert rel_err(out, want) <= TOLERANCE[dtype]
    weights = torch.randn(23, 7, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights.to(device, dtype)).sum(), hidden)
    (grad_ref,) = torch.autograd.grad((want * weights.to(dtype).double()).sum(), h64)
    assert grad.dtype == dtype and rel_err(grad, grad_ref) <= TOLERANCE[dtype]


def _loop_mean_autograd(hidden, ids, num_segments):
    rows = [hidden[ids == w].mean(dim=0) if (ids == w).any() else hidden.new_zeros(hidden.shape[1])
            for w in range(num_segments)]
    return torch.stack(rows)


def test_batched_input_and_default_count():
    hidden = randn(2 * 5, 3, seed=3).view(2, 5, 3)
    ids = torch.tensor([[0, 0, 1, -1, -1], [2, 3, 3, 3, -1]])
    out = mk.segment_mean(hidden, ids)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out[3], hidden[1, 1:4].mean(dim=0))


def test_ignored_rows_never_leak_nan():
    hidden = randn(6, 4, seed=4)
    hidden[5] = float("nan")
    out = mk.segment_mean(hidden, torch.tensor([0, 0, 1, 1, 2, -1]))
    assert torch.isfinite(out).all()
    hidden[1, 0] = float("nan")
    assert torch.isnan(mk.segment_mean(hidden, torch.tensor([0, 0, 1, 1, 2, -1]))[0, 0])


def test_compiles_with_a_given_count():
    f = torch.compile(lambda h, i: mk.segment_mean(h, i, num_segments=5), fullgraph=True, backend="aot_eager")
    hidden, ids = randn(12, 3, seed=5), torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, -1, -1, 1])
    torch.testing.assert_close(f(hidden, ids), _loop_mean(hidden, ids, 5))


@pytest.mark.parametrize("num_segments", [None, 0, 2])
@pytest.mark.parametrize("ignored", [-1, -100])
def test_a_batch_without_words(num_segments, ignored):
    """Every row ignored (a batch with no aligned word; -100 is Hugging Face's ignore id): empty or
    all-zero words, zero gradient."""
    hidden = leaf(randn(5, 3, seed=6))
    out = mk.segment_mean(hidden, torch.full((5,), ignored), num_segments=num_segments)
    assert out.shape == (num_segments or 0, 3) and not out.any()
    (out.sum() + 0 * hidden.sum()).backward()
    assert not hidden.grad.any()


@pytest.mark.parametrize("dtype,rows", [(torch.bfloat16, 300), (torch.float16, 3000)], ids=str)
def test_long_segments_in_half_precision(dtype, rows):
    """Sums and counts in float32: a bfloat16 count stops at 256 and a float16 one at 2048."""
    hidden = torch.full((rows, 4), 2.0, dtype=dtype)
    hidden[0] = 1.0
    out = mk.segment_mean(hidden, torch.zeros(rows, dtype=torch.long))
    assert out.dtype == dtype
    torch.testing.assert_close(out[0].float(), torch.full((4,), (2.0 * rows - 1) / rows).to(dtype).float())
