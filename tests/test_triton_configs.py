"""The Triton kernels' code paths that only some autotune configs take, each run and checked.

The shared tables run one config per kernel (the interpreter's, or whichever the autotuner picks
on a GPU). The gradient kernels keep 1, 2 or 3 accumulator chunks per program (``CHUNKS``, a
constexpr that changes the code); here each count runs, with chunks narrower than D so that spans
end mid-chunk and past D, against the float64 chunked backend. Small blocks keep the interpreter
fast; on a GPU the same configs run compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from mmkd_test_support import TOLERANCE, rel_err
from mmkd_kernels import chunked
from mmkd_kernels.triton import contrastive, structure

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, M, D = 45, 77, 70  # 70 = 4 chunks of 16 and a part: spans of 1, 2 and 3 chunks end inside D or past it


def _only(monkeypatch, kernel, config):
    """Run ``kernel`` with ``config`` alone: one config is run without timing or pruning."""
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "early_config_prune", None)


def _chunked_config(chunks):
    return triton.Config(dict(BLOCK_A=32, BLOCK_B=32, BLOCK_D=32, BLOCK_DO=16, CHUNKS=chunks), num_warps=4,
                         num_stages=2)


def _inputs(seed, dtype, n=N, m=M):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, D, generator=generator).to(DEVICE, dtype)
    k = torch.randn(m, D, generator=generator).to(DEVICE, dtype)
    return q, k, generator


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
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
    """The gradient kernel of both sides, over a slice of rows (row_start > 0): its programs with
    computed rows and those without."""
    _only(monkeypatch, structure._grad_kernel, _chunked_config(chunks))
    s, t, _ = _inputs(20 + chunks, torch.float32, m=N)
    got = structure.structure_tile_forward_with_grad(s, t, kind, 2.0, True, 5, 31, True, True)
    want = chunked.structure_tile_forward_with_grad(s.cpu().double(), t.cpu().double(), kind, 2.0, True, 5, 31,
                                                    True, True)
    for out, ref in zip(got, want):
        assert rel_err(out, ref) < TOLERANCE[torch.float32]


_PLUMBING = """
import json, sys, torch
from mmkd_kernels.triton import contrastive, structure
out = {}
for name, kernel, arg in (("lse", contrastive._lse_kernel, "A"), ("grad", contrastive._grad_kernel, "A"),
                          ("rows", structure._rows_kernel, "S")):
    picks = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        chosen = kernel.early_config_prune(kernel.configs, {arg: torch.empty(0, dtype=dtype)})
        half = kernel.configs_by_dtype["float32" if dtype == torch.float32 else "half"]
        picks[str(dtype)] = [half.index(c) for c in chosen]
    # _do_bench: the timer given to triton.autotune (None: the driver's, which needs a GPU to exist).
    timed = None if kernel._do_bench is None else kernel._do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8))
    out[name] = dict(picks=picks, n=len(kernel.configs), timed=timed, keys=kernel.keys)
print(json.dumps(out))
"""


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_gpu_autotuning_plumbing(autotune):
    """What a GPU process builds (no interpreter): each dtype is offered its own list, all of it when
    tuning and its first config, untimed, with MMKD_TRITON_AUTOTUNE=0. Checked in a process of its
    own, since this one interprets; nothing is launched, so no GPU is needed. Each kernel is tuned
    per variant (its constexpr switches) as well as per size."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MMKD_TRITON_AUTOTUNE"] = autotune
    run = subprocess.run([sys.executable, "-c", _PLUMBING], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["lse"]["keys"] == ["d", "n_key", "COLUMNS", "SPLIT"]
    assert out["grad"]["keys"] == ["d", "n_key", "SPLIT", "HAS_A_TERM", "HAS_B_TERM"]
    assert out["rows"]["keys"] == ["ds", "dt", "n_key", "KIND", "CENTRED"]
    for name in ("lse", "grad", "rows"):
        picks = out[name]["picks"]
        if autotune == "1":
            assert picks["torch.float32"] == list(range(len(picks["torch.float32"])))
            assert len(picks["torch.float32"]) > 1
            assert picks["torch.float16"] == picks["torch.bfloat16"] == list(range(len(picks["torch.float16"])))
            assert len(picks["torch.float16"]) > 1 and out[name]["timed"] is None
        else:
            assert picks == {"torch.float32": [0], "torch.float16": [0], "torch.bfloat16": [0]}
            assert out[name]["n"] == 2 and out[name]["timed"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("normalize,scale,deterministic,passes", [
    (True, 20.0, False, 1),  # columns' statistics from the rows' pass (fixed shift, atomic sums)
    (True, 20.0, True, 2),  # bitwise reproducibility asked for: a second pass, no atomics
    (True, 50.0, False, 2),  # e^{−2|scale|} too small for a fixed shift
    (False, 20.0, False, 2),  # z unbounded
])
@pytest.mark.parametrize("aligned", [False, True])
def test_symmetric_column_statistics(monkeypatch, normalize, scale, deterministic, passes, aligned):
    calls = []
    row_lse = contrastive._row_lse
    monkeypatch.setattr(contrastive, "_row_lse", lambda *args: calls.append(1) or row_lse(*args))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    generator = torch.Generator().manual_seed(passes + 2 * aligned)
    q = torch.randn(N, D, generator=generator)
    k = q + 0.01 * torch.randn(N, D, generator=generator) if aligned else torch.randn(N, D, generator=generator)
    targets = torch.arange(N)
    got = contrastive.contrastive_forward(q.to(DEVICE), k.to(DEVICE), targets.to(DEVICE), scale, normalize, True)
    want = chunked.contrastive_forward(q.double(), k.double(), targets, scale, normalize, True)
    assert len(calls) == passes
    for name, out, ref in zip(("row_loss", "col_loss", "row_lse", "col_lse"), got, want):
        assert rel_err(out, ref) < TOLERANCE[torch.float32], name


def _timed_by_running(kernel_call, quantiles=None):
    """A GPU autotuner's timer: it runs each config on the call's own buffers before the real run;
    here three times, untimed."""
    for _ in range(3):
        kernel_call()
    return [1.0, 1.0, 1.0] if quantiles else 1.0


def test_autotuning_changes_no_result(monkeypatch):
    """Every kernel offered two configs and timed by running them, as a GPU's autotuner does on the
    first call of each shape: the results must be those of one run. The symmetric loss's column sums
    are atomic adds into a zeroed buffer; without reset_to_zero each timing run added to them."""
    kernels = (contrastive._lse_kernel, contrastive._lse_grad_kernel, contrastive._grad_kernel,
               structure._rows_kernel, structure._grad_kernel)
    for kernel in kernels:
        first = dict(kernel.configs[0].kwargs)
        small = {name: 32 if name.startswith("BLOCK_") else value for name, value in first.items()}
        monkeypatch.setattr(kernel, "configs", [triton.Config(small), triton.Config(first)])
        monkeypatch.setattr(kernel, "early_config_prune", None)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_do_bench", _timed_by_running)
    # The symmetric loss's one-pass column statistics (atomic adds) run where determinism is not asked for.
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    q, k, _ = _inputs(40, torch.float32, m=N)
    q64, k64 = q.cpu().double(), k.cpu().double()
    targets = torch.arange(N)
    checks = [
        (contrastive.contrastive_forward(q, k, targets.to(DEVICE), 20.0, True, True),
         chunked.contrastive_forward(q64, k64, targets, 20.0, True, True)),
        (contrastive.contrastive_forward_with_grad(q, k, targets.to(DEVICE), 20.0, True, True, True),
         chunked.contrastive_forward_with_grad(q64, k64, targets, 20.0, True, True, True)),
        (structure.structure_tile_forward_with_grad(q, k, "kl", 2.0, True, 0, N, True, True),
         chunked.structure_tile_forward_with_grad(q64, k64, "kl", 2.0, True, 0, N, True, True)),
    ]
    assert all(kernel.cache for kernel in kernels), "a kernel was not autotuned"
    for got, want in checks:
        for out, ref in zip(got, want):
            assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_int64_offsets_where_an_element_lies_2_31_past_the_first():
    """The launchers' choice of int64 indices: exactly where the last element's offset, Σ (size − 1)
    · stride of the view as given, reaches 2^31 (int32 holds 2^31 − 1). Meta tensors: no memory."""
    from mmkd_kernels.triton.tiles import needs_int64_offsets

    def view(shape, stride):
        return torch.empty_strided(shape, stride, device="meta")

    assert not needs_int64_offsets(view((65, 64), (2**25 - 1, 1)))  # 64·(2^25 − 1) + 63 < 2^31
    assert needs_int64_offsets(view((65, 64), (2**25, 1)))  # row 64 starts at 2^31
    assert not needs_int64_offsets(view((2**21, 1024), (1024, 1)))  # a contiguous 2^31 elements
    assert needs_int64_offsets(view((2**21 + 1, 1024), (1024, 1)))
    assert needs_int64_offsets(view((2**16, 2**15 + 1), (1, 2**16)))  # transposed: the column stride
    assert not needs_int64_offsets(view((0, 2**16), (2**16, 1)), view((3, 4), (4, 1)))  # empty: nothing read
    assert needs_int64_offsets(view((3, 4), (4, 1)), view((65, 64), (2**25, 1)))  # any of them


def test_every_launch_runs_on_its_inputs_gpu(monkeypatch):
    """Triton launches on the current device: each op sets its first input's GPU as current for the
    launch (recorded here with a stand-in for torch.cuda.device), and leaves a CPU input alone."""
    import contextlib

    from mmkd_kernels import triton as triton_backend

    entered = []

    @contextlib.contextmanager
    def device(where):
        entered.append(where)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launch = triton_backend.on_the_inputs_device(lambda first, *args, **kwargs: seen.append((first, args, kwargs)))

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    first = OnSecondGpu()
    launch(first, 2, scale=3.0)
    assert entered == [torch.device("cuda", 1)] and seen == [(first, (2,), {"scale": 3.0})]
    launch(torch.zeros(1), 4)
    assert entered == [torch.device("cuda", 1)] and len(seen) == 2
    from mmkd_kernels import ops

    assert set(triton_backend.IMPLS) == set(ops.SCHEMAS)  # every op goes through it
    assert all(getattr(impl, "__wrapped__", None) is not None for impl in triton_backend.IMPLS.values())


def test_columns_are_split_only_where_the_row_blocks_leave_the_gpu_idle(monkeypatch):
    """The launchers' choice of column splits (tiles.column_split), on an H100's 132 multiprocessors
    (a stand-in: no GPU is asked): one split where the programs fill more than half of them, else
    about two programs per multiprocessor with every split at least MIN_SPLIT_COLUMNS long and cut
    at a multiple of 128 columns; one split on a CPU and for no rows; MMKD_TRITON_COLUMN_SPLITS
    overrides, and a bad value is an error that names it."""
    from mmkd_kernels.triton import tiles

    monkeypatch.delenv("MMKD_TRITON_COLUMN_SPLITS", raising=False)
    monkeypatch.setattr(tiles, "_multiprocessors", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert tiles.MIN_SPLIT_COLUMNS == 4096
    assert tiles.column_split(65536, 65536, gpu) == (65536, 1)  # 1024 row blocks
    assert tiles.column_split(65536, 65536, gpu, 768) == (65536, 1)
    assert tiles.column_split(4096, 4096, gpu, 768) == (4096, 1)  # the merge would cost what splitting saves
    # A rank's 512 rows (8 row blocks) against 65536 gathered columns: 33 splits would fill two waves,
    # 16 keep 4096 columns each.
    assert tiles.column_split(65536, 512, gpu) == (4096, 16)
    assert tiles.column_split(65536, 512, gpu, 768) == (4096, 16)  # 2 spans of D: 16 programs per split
    assert tiles.column_split(65536 * 4, 512, gpu, 768) == (15488, 17)  # cdiv(264, 16), whole 128-column tiles
    assert tiles.column_split(65536, 512, gpu, 768, half=False) == (65536, 1)  # float32: 12 spans of 64
    assert tiles.column_split(8192, 4096, gpu) == (4096, 2)  # 64 row blocks: half a wave
    assert tiles.column_split(4000, 512, gpu) == (4000, 1)  # too few columns for two splits
    assert tiles.column_split(65536, 0, gpu, 768) == (65536, 1)  # no rows: nothing to fill
    assert tiles.column_split(65536, 512, torch.device("cpu")) == (65536, 1)
    monkeypatch.setenv("MMKD_TRITON_COLUMN_SPLITS", "3")
    assert tiles.column_split(300, 37, torch.device("cpu")) == (100, 3)
    assert tiles.column_split(1000, 37, gpu) == (384, 3)  # 334 rounded up to whole 128-column tiles
    assert tiles.column_split(2, 37, gpu) == (1, 2)  # never an empty split
    assert tiles.column_split(0, 37, gpu) == (0, 1)
    monkeypatch.setenv("MMKD_TRITON_COLUMN_SPLITS", "1")
    assert tiles.column_split(65536, 512, gpu) == (65536, 1)
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("MMKD_TRITON_COLUMN_SPLITS", bad)
        with pytest.raises(ValueError, match="MMKD_TRITON_COLUMN_SPLITS must be a positive integer"):
            tiles.column_split(300, 37, torch.device("cpu"))
