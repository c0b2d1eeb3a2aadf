"""Every bad input of DESIGN §2 raises ValueError/TypeError naming the argument and what it got."""

import os
import re

import pytest
import torch

import mmkd_kernels as mk
from mmkd_test_support import randn

Q, K = randn(8, 16, seed=0), randn(8, 16, seed=1)


@pytest.mark.parametrize("call,error,match", [
    (lambda: mk.contrastive_loss(Q, randn(8, 12, seed=2)), ValueError, r"same width D.*\(8, 16\).*\(8, 12\)"),
    (lambda: mk.contrastive_loss(Q[0], K), ValueError, r"student must be 2-D.*\(16,\)"),
    (lambda: mk.contrastive_loss(Q, K[None]), ValueError, r"teacher must be 2-D.*\(1, 8, 16\)"),
    (lambda: mk.contrastive_loss(Q[:0], K), ValueError, r"student must have at least one row.*\(0, 16\)"),
    (lambda: mk.contrastive_loss(Q, K, temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
    (lambda: mk.contrastive_loss(Q, K, temperature=-1), ValueError, r"temperature .* got -1"),
    (lambda: mk.contrastive_loss(Q, K, temperature=float("inf")), ValueError, r"temperature .* got inf"),
    (lambda: mk.contrastive_loss(Q, K, temperature=torch.tensor(0.1)), TypeError, r"temperature must be a Python number, got Tensor"),
    (lambda: mk.contrastive_loss(Q, K, temperature=1e-310), ValueError, r"reciprocal .* is finite, got 1e-310"),
    (lambda: mk.ContrastiveLoss(temperature=-1), ValueError, r"temperature .* got -1"),
    (lambda: mk.ContrastiveLoss(reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (lambda: mk.ContrastiveLoss(backend="cuda"), ValueError, r"backend must be one of .*got 'cuda'"),
    (lambda: mk.ContrastiveLoss(normalize="no"), TypeError, r"normalize must be True or False, got 'no'"),
    (lambda: mk.StructureLoss(normalize=0), TypeError, r"normalize must be True or False, got 0"),
    (lambda: mk.contrastive_loss(Q, K, normalize="no"), TypeError, r"normalize must be True or False, got 'no'"),
    (lambda: mk.contrastive_loss(Q, K, symmetric=1), TypeError, r"symmetric must be True or False, got 1"),
    (lambda: mk.structure_loss(Q, K, normalize=None), TypeError, r"normalize must be True or False, got None"),
    (lambda: mk.StructureLoss(kind="cosine"), ValueError, r"kind must be one of 'pearson', 'mse', 'kl', got 'cosine'"),
    (lambda: mk.StructureLoss(algorithm="fft"), ValueError, r"algorithm must be one of .*got 'fft'"),
    (lambda: mk.contrastive_loss(Q, K, targets=torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])), ValueError, r"targets must lie in \[0, 8\).*\[0, 8\]"),
    (lambda: mk.contrastive_loss(Q, K, targets=torch.tensor([0, 1, 2, 3, 4, 5, 6, -1])), ValueError, r"targets must lie in \[0, 8\).*\[-1, 6\]"),
    (lambda: mk.contrastive_loss(Q, K, targets=torch.arange(7)), ValueError, r"targets must have shape \(8,\).*\(7,\)"),
    (lambda: mk.contrastive_loss(Q, K, targets=torch.zeros(8)), TypeError, r"targets must be an int64 or int32 tensor.*float32"),
    (lambda: mk.contrastive_loss(Q, K, targets=torch.zeros(8, dtype=torch.int16)), TypeError,
     r"targets must be an int64 or int32 tensor, got dtype torch.int16"),
    (lambda: mk.contrastive_loss(Q, K, targets=[0] * 8), TypeError, r"targets must be a torch.Tensor.*list"),
    (lambda: mk.contrastive_loss(Q, K[:5]), ValueError, r"at least as many rows.*student 8 rows and teacher 5 rows"),
    (lambda: mk.contrastive_loss(Q, randn(9, 16, seed=3), symmetric=True), ValueError, r"symmetric=True needs .* N=8 and M=9"),
    (lambda: mk.contrastive_loss(Q, K, symmetric=True, targets=torch.arange(8)), ValueError, r"symmetric=True .* targets must be None"),
    (lambda: mk.contrastive_loss(Q, K, reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (lambda: mk.contrastive_loss(Q.long(), K), TypeError, r"student must be a floating-point tensor, got dtype torch.int64"),
    (lambda: mk.contrastive_loss(Q, K.int()), TypeError, r"teacher must be a floating-point tensor, got dtype torch.int32"),
    (lambda: mk.contrastive_loss(Q.numpy(), K), TypeError, r"student must be a torch.Tensor, got ndarray"),
    (lambda: mk.contrastive_loss(Q, K.to("meta")), ValueError, r"one device, got cpu and meta"),
    (lambda: mk.contrastive_loss(Q, K, backend="cuda"), ValueError, r"backend must be one of .*got 'cuda'"),
    (lambda: mk.contrastive_loss(Q, K, backend=3), TypeError, r"backend must be a str, got int"),
    (lambda: mk.contrastive_loss(Q, K, process_group=object()), ValueError, r"torch.distributed is not initialized"),
    (lambda: mk.structure_loss(Q, randn(7, 16, seed=4)), ValueError, r"same number of rows N.*\(8, 16\).*\(7, 16\)"),
    (lambda: mk.structure_loss(Q, K[:, :3].unsqueeze(0)), ValueError, r"teacher must be 2-D"),
    (lambda: mk.structure_loss(Q[:2], K[:2]), ValueError, r"kind='pearson' needs at least 3 rows.*N=2"),
    (lambda: mk.structure_loss(Q[:1], K[:1], kind="kl"), ValueError, r"kind='kl' needs at least 2 rows.*N=1"),
    (lambda: mk.structure_loss(Q[:1], K[:1], kind="mse"), ValueError, r"kind='mse' needs at least 2 rows.*N=1"),
    (lambda: mk.structure_loss(Q, K, kind="cosine"), ValueError, r"kind must be one of 'pearson', 'mse', 'kl', got 'cosine'"),
    (lambda: mk.structure_loss(Q, K, algorithm="fft"), ValueError, r"algorithm must be one of .*got 'fft'"),
    (lambda: mk.structure_loss(Q, K, kind="kl", algorithm="gram"), ValueError, r"algorithm='gram' exists for kind='mse' and kind='pearson' only"),
    (lambda: mk.structure_loss(Q, K, kind="kl", temperature=0), ValueError, r"temperature must be a finite number > 0"),
    (lambda: mk.structure_loss(Q.half().long(), K), TypeError, r"student must be a floating-point tensor"),
    (lambda: mk.structure_loss(Q, K.to("meta")), ValueError, r"one device, got cpu and meta"),
    (lambda: mk.segment_mean(Q, torch.zeros(8)), TypeError, r"segment_ids must be an integer torch.Tensor, got torch.float32"),
    (lambda: mk.segment_mean(Q.long(), torch.zeros(8, dtype=torch.long)), TypeError, r"hidden must be a floating-point"),
    (lambda: mk.segment_mean(Q, torch.zeros(7, dtype=torch.long)), ValueError, r"segment_ids its leading shape.*\(8, 16\).*\(7,\)"),
    (lambda: mk.segment_mean(Q, torch.arange(8), num_segments=4), ValueError, r"segment_ids must be < num_segments=4, got max 7"),
    (lambda: mk.segment_mean(Q, torch.arange(8), num_segments=-1), ValueError, r"num_segments must be an int >= 0, got -1"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name,reason", [
    ("triton", "backend='triton' needs the triton package"),
    ("native", "backend='native' could not be built just in time: OSError: no compiler"),
])
def test_unavailable_backend_says_why(monkeypatch, name, reason):
    """Whatever this machine has: each backend made unavailable the way a user's machine would lack
    it (no triton package; an extension neither built nor buildable)."""
    from mmkd_kernels import backends, native

    monkeypatch.setattr(backends, "_TRITON_FOUND", False)
    monkeypatch.setattr(native, "load", lambda build: reason if build else "backend='native' is not built")
    assert mk.available_backends() == ["reference", "chunked"]
    with pytest.raises(ValueError, match=re.escape(reason)):
        mk.contrastive_loss(Q, K, backend=name)
    with pytest.raises(ValueError, match=re.escape(reason)):
        mk.structure_loss(Q, K, backend=name)
    assert mk.contrastive_loss(Q, K, backend="auto").isfinite()  # auto falls back to chunked


def test_the_installed_backends_are_all_here():
    """The shared tables run every backend that mk.available_backends() lists: one that failed to
    load would leave its cases out without a word. Triton is a dependency (Linux), and the make
    targets build the extension, so both must be here; on a GPU, the extension's CUDA kernels too
    unless the build was told MMKD_BUILD_CUDA=0."""
    from mmkd_kernels import backends, native

    assert backends.unavailable_reason("triton") is None
    assert backends.unavailable_reason("native") is None
    if torch.cuda.is_available() and os.environ.get("MMKD_BUILD_CUDA") != "0":
        assert native.has_cuda_kernels(), "a GPU is here but mmkd_kernels._C has no CUDA kernels (see the build log)"


def test_triton_refusals_say_why(monkeypatch):
    from mmkd_kernels import backends

    if "triton" in mk.available_backends():
        with pytest.raises(ValueError, match="backend='triton' computes float32, float16 and bfloat16"):
            mk.contrastive_loss(Q.double(), K.double(), backend="triton")
        with pytest.raises(TypeError, match="mmkd_triton ops take float32, float16 or bfloat16 inputs, got torch.float64"):
            torch.ops.mmkd_triton.contrastive_forward(Q.double(), K.double(), torch.arange(8), 1.0, True, False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends.unavailable_reason("triton", torch.device("cpu"), torch.float32)
    assert reason is not None and "needs CUDA tensors" in reason and "got cpu tensors" in reason


def test_available_backends_lists_the_pure_pytorch_ones():
    backends = mk.available_backends()
    assert backends[:2] == ["reference", "chunked"]
    assert set(backends) <= {"reference", "chunked", "triton", "native"}


def test_auto_never_picks_the_reference():
    from mmkd_kernels import backends

    assert backends.resolve("auto", torch.device("cpu")) != "reference"


@pytest.mark.parametrize("backend", [b for b in ("chunked", "native") if b in mk.available_backends()])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_targets_out_of_range_fail_under_torch_compile(backend, compiler):
    """The eager check reads the targets' values, which a compiled graph cannot; an assert in the
    graph fails instead (before it, native read past its rows and chunked wrapped -1 to the last)."""
    f = torch.compile(lambda a, b, t: mk.contrastive_loss(a, b, targets=t, backend=backend), fullgraph=True,
                      backend=compiler)
    good = f(Q, K, torch.arange(8))
    assert torch.isfinite(good)
    for bad in ([0, 1, 2, 3, 4, 5, 6, 8], [0, 1, 2, 3, 4, 5, 6, -1]):
        with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 8\)"):
            f(Q, K, torch.tensor(bad))


@pytest.mark.parametrize("backend", [b for b in ("native",) if b in mk.available_backends()])
def test_native_op_checks_targets_itself(backend):
    """Called directly, past the public checks, the native op refuses an out-of-range target."""
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 8\) .* got 1000000 at row 7"):
        torch.ops.mmkd_native.contrastive_forward(Q, K, torch.tensor([0, 1, 2, 3, 4, 5, 6, 1000000]), 20.0, True, False)
