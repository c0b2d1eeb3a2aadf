"""No two programs of a Triton kernel here race, and none touches memory outside its tensors
(tests/triton_races.py, under the interpreter).

The interpreter runs a launch's programs one after another, so the numerical tests cannot see a
race: a GPU runs them at once. Nor does a read past a tensor's end fail here: the interpreter
reads whatever lies there. Here every kernel, in every variant its launchers use and with the
block shapes of every config offered to a GPU's autotuner, runs with its memory accesses recorded,
and no launch may have a byte that two programs store, or that one stores and another reads, or
that one updates atomically and another touches plainly, nor an access that no one tensor argument
holds. Each launch must have several programs along each axis of its grid, or a race would have no
one to race with. Racy toy kernels show that the recorder finds each kind of race.
"""

import pytest
import torch
import triton
import triton.language as tl

from mmkd_test_support import INTERPRETED
from mmkd_kernels.triton import contrastive, structure

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="the race recorder instruments Triton's interpreter; "
                                "a GPU runs the kernels compiled (these tests run on CI's CPU)")

if INTERPRETED:
    from triton_races import recording_races

# Two row blocks of the interpreter's 64 rows, and two spans of its 2 × 64 gradient columns.
N, M, D = 100, 130, 150


def _inputs(seed, n=N, m=M, d=D):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator), torch.randn(m, d, generator=generator), generator


def _race_free(launches, kernels):
    """Every launch ran several programs along each axis of its grid, had no race and stayed
    within its tensors."""
    assert [launch.kernel for launch in launches] == kernels
    for launch in launches:
        assert launch.races == {}, f"{launch.kernel} (grid {launch.grid}): {launch.races}"
        assert launch.stored_bytes > 0, launch.kernel
        axes = 2 if launch.kernel in ("_lse_grad_kernel", "_grad_kernel") else 1
        assert all(size > 1 for size in launch.grid[:axes]), f"{launch.kernel}: one program on an axis of {launch.grid}"


def _forward(symmetric):
    return lambda q, k, targets, generator: lambda: contrastive.contrastive_forward(q, k, targets, 20.0, True,
                                                                                   symmetric)


def _forward_with_grad(normalize, need_k):
    """normalize=True: the fixed shift (z bounded); False: the running max."""
    return lambda q, k, targets, generator: lambda: contrastive.contrastive_forward_with_grad(
        q, k, targets, 20.0, normalize, True, need_k)


def _backward(symmetric):
    def make(q, k, targets, generator):
        saved = contrastive.contrastive_forward(q, k, targets, 20.0, True, symmetric)
        grads = torch.rand(q.shape[0], generator=generator), torch.rand(k.shape[0], generator=generator)
        return lambda: contrastive.contrastive_backward(*grads, q, k, targets, saved[2], saved[3], saved[0], saved[1],
                                                        20.0, True, symmetric, True, True)
    return make


CONTRASTIVE_CASES = {
    # name: (square z, deterministic, makes the call from (q, k, targets, generator), the kernels it launches)
    "forward": (False, True, _forward(False), ["_lse_kernel"]),
    "symmetric forward, one pass (atomic column sums)": (True, False, _forward(True), ["_lse_kernel"]),
    "symmetric forward, two passes": (True, True, _forward(True), ["_lse_kernel", "_lse_kernel"]),
    "forward with gradients, fixed shift":
        (False, True, _forward_with_grad(True, True), ["_lse_grad_kernel", "_grad_kernel"]),
    "forward with gradients, running max": (False, True, _forward_with_grad(False, False), ["_lse_grad_kernel"]),
    "backward": (False, True, _backward(False), ["_grad_kernel", "_grad_kernel"]),
    "symmetric backward": (True, True, _backward(True), ["_grad_kernel", "_grad_kernel"]),
}


def _contrastive_case(monkeypatch, name, seed, n=N, d=D):
    """(the call, the kernels it launches in order) of a case, on fresh (n, d) rows: as many
    columns, or 30 more."""
    square, deterministic, make, kernels = CONTRASTIVE_CASES[name]
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    m = n if square else n + 30
    q, k, generator = _inputs(seed, n=n, m=m, d=d)
    targets = torch.arange(n) if square else torch.randint(0, m, (n,), generator=generator)
    return make(q, k, targets, generator), kernels


@pytest.mark.parametrize("name", list(CONTRASTIVE_CASES))
@pytest.mark.parametrize("splits", ["1", "3"])
def test_contrastive_kernels_do_not_race(monkeypatch, name, splits):
    """Each kernel, with its columns in one split and in three (each split's partial outputs its own)."""
    monkeypatch.setenv("MMKD_TRITON_COLUMN_SPLITS", splits)
    call, kernels = _contrastive_case(monkeypatch, name, seed=len(name))
    with recording_races() as launches:
        call()
    _race_free(launches, kernels)
    assert all(launch.grid[1 if launch.kernel == "_lse_kernel" else 2] == int(splits) for launch in launches)


# kind, scale, normalize: kl takes its centred form for cosine similarities at a bounded scale.
STRUCTURE_CASES = [("mse", 1.0, True), ("pearson", 1.0, True), ("kl", 2.0, True), ("kl", 2.0, False)]


@pytest.mark.parametrize("kind,scale,normalize", STRUCTURE_CASES)
@pytest.mark.parametrize("row_start,row_count", [(0, N), (5, 70)])
def test_structure_kernels_do_not_race(kind, scale, normalize, row_start, row_count):
    """A slice of the rows (row_start > 0, as a rank of a process group computes) too: there some
    gradient programs hold computed rows and some only column terms."""
    s, t, _ = _inputs(len(kind) + row_start, m=N)
    with recording_races() as launches:
        structure.structure_tile_forward_with_grad(s, t, kind, scale, normalize, row_start, row_count, True, True)
    _race_free(launches, ["_rows_kernel", "_grad_kernel", "_grad_kernel"])


# The kernels, each with the configs a GPU's autotuner is offered and the call that launches it.
GPU_CONFIGS = {
    "contrastive._lse_kernel": (contrastive._lse_kernel, contrastive._STATS_HALF + contrastive._STATS_FLOAT32,
                                "symmetric forward, one pass (atomic column sums)"),
    "contrastive._lse_grad_kernel": (contrastive._lse_grad_kernel, contrastive._GRAD_HALF + contrastive._GRAD_FLOAT32,
                                     "forward with gradients, fixed shift"),
    "contrastive._grad_kernel": (contrastive._grad_kernel, contrastive._GRAD_HALF + contrastive._GRAD_FLOAT32,
                                 "symmetric backward"),
    "structure._rows_kernel": (structure._rows_kernel, structure._ROWS_HALF + structure._ROWS_FLOAT32, "structure"),
    "structure._grad_kernel": (structure._grad_kernel, structure._GRAD_HALF + structure._GRAD_FLOAT32, "structure"),
}
# Each distinct block shape (warps and stages change no address).
SHAPES = [(name, shape) for name, (_, configs, _) in GPU_CONFIGS.items()
          for shape in {tuple(c.kwargs.items()): None for c in configs}]


def _sizes(blocks: dict) -> tuple[int, int]:
    """(N, D) just past one block of the shape: two blocks of rows, two tiles of columns and, for a
    gradient kernel, two spans of D; the interpreter's time grows with the blocks run."""
    span = blocks.get("CHUNKS", 0) * blocks.get("BLOCK_DO", 0)
    return max(blocks["BLOCK_A"], blocks["BLOCK_B"]) + 9, (span + 11 if span else blocks["BLOCK_D"] + 5)


@pytest.mark.parametrize("name,shape", SHAPES,
                         ids=[f"{name}-" + "-".join(str(value) for _, value in shape) for name, shape in SHAPES])
def test_gpu_block_shapes_do_not_race(monkeypatch, name, shape):
    """Each block shape among the configs of each kernel that a GPU's autotuner may choose, the
    other kernels of the call keeping the interpreter's. Whether programs overlap depends on how the
    blocks of rows, columns and gradient spans divide the inputs, which these shapes vary."""
    kernel, _, case = GPU_CONFIGS[name]
    blocks = dict(shape)
    monkeypatch.setattr(kernel, "configs", [triton.Config(blocks)])
    monkeypatch.setattr(kernel, "early_config_prune", None)
    n, d = _sizes(blocks)
    if case == "structure":
        s, t, _ = _inputs(7, n=n, m=n, d=d)
        with recording_races() as launches:
            structure.structure_tile_forward_with_grad(s, t, "kl", 2.0, True, 5, n - 7, True, True)
    else:
        call, _ = _contrastive_case(monkeypatch, case, seed=7, n=n, d=d)
        with recording_races() as launches:
            call()
    for launch in launches:
        assert launch.races == {}, f"{launch.kernel} (grid {launch.grid}): {launch.races}"
    mine = [launch for launch in launches if launch.kernel == kernel.fn.__name__]
    axes = 2 if "grad" in name else 1
    assert mine and all(size > 1 for launch in mine for size in launch.grid[:axes]), [launch.grid for launch in mine]


# Racy toy kernels: the recorder must find each kind of race, and nothing in a kernel without one.
@triton.jit
def _own_rows(X, OUT, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, tl.load(X + offs) * 2.0)


@triton.jit
def _all_store_the_first_block(X, OUT, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(OUT + offs, tl.load(X + tl.program_id(0) * BLOCK + offs))


@triton.jit
def _read_the_next_block(X, OUT, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) + 1.0)
    tl.store(OUT + offs, tl.load(X + (offs + BLOCK) % (2 * BLOCK)))


@triton.jit
def _add_atomically_where_one_stores(X, OUT, BLOCK: tl.constexpr):
    if tl.program_id(0) == 0:
        tl.store(OUT, 0.0)
    tl.atomic_add(OUT, tl.sum(tl.load(X + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK))))


@triton.jit
def _add_atomically(X, OUT, BLOCK: tl.constexpr):
    tl.atomic_add(OUT, tl.sum(tl.load(X + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK))))


@triton.jit
def _store_then_load(X, OUT, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    reversed_offs = tl.program_id(0) * BLOCK + (BLOCK - 1 - tl.arange(0, BLOCK))
    tl.store(OUT + offs, tl.load(X + offs))
    tl.store(OUT + offs, tl.load(OUT + reversed_offs) + 1.0)


@triton.jit
def _overlapping_widths(X, OUT, BLOCK: tl.constexpr):
    """Program 1 stores the first half-precision pair of a float32 that program 0 stores."""
    if tl.program_id(0) == 0:
        tl.store(OUT, tl.load(X))
    else:
        tl.store(OUT.to(tl.pointer_type(tl.float16)) + 1, tl.load(X).to(tl.float16))


@triton.jit
def _past_the_end(X, OUT, BLOCK: tl.constexpr):
    """Program 1 reads half a block past X's end: into OUT, which lies right after X."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, tl.load(X + offs + tl.program_id(0) * (BLOCK // 2)))


@triton.jit
def _add_atomically_where_one_reads(X, OUT, BLOCK: tl.constexpr):
    if tl.program_id(0) == 0:
        tl.store(OUT + 1, tl.load(OUT))
    tl.atomic_add(OUT, tl.sum(tl.load(X + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK))))


@pytest.mark.parametrize("kernel,races", [
    (_own_rows, {}),
    (_add_atomically, {}),
    (_all_store_the_first_block, {"store/store": ("OUT", 32 * 4)}),
    (_read_the_next_block, {"store/load": ("X", 2 * 32 * 4)}),
    (_add_atomically_where_one_stores, {"atomic/store": ("OUT", 4)}),
    (_add_atomically_where_one_reads, {"atomic/load": ("OUT", 4)}),
    (_store_then_load, {"own store/load": ("OUT", 2 * 32 * 4)}),
    (_overlapping_widths, {"store/store": ("OUT", 2)}),
    # The whole stray load (from X[48]), and OUT[0:16], which program 0 stores, read by program 1.
    (_past_the_end, {"out of bounds": ("X", 32 * 4), "store/load": ("OUT", 16 * 4)}),
], ids=lambda x: getattr(getattr(x, "fn", None), "__name__", "races"))
def test_the_recorder_finds_each_kind_of_race(kernel, races):
    """Each toy kernel's races, and the argument named for them. X and OUT are the two halves of one
    storage, so that a read past X's end lands in OUT, another argument, as it may on a GPU."""
    storage = torch.randn(128)
    x, out = storage[:64], storage[64:]
    with recording_races() as launches:
        kernel[(2,)](x, out, BLOCK=32)
    (launch,) = launches
    assert launch.kernel == kernel.fn.__name__ and launch.grid == (2, 1, 1)
    assert {kind: (name, count) for kind, (count, name) in launch.races.items()} == races
