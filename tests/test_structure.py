"""structure_loss on every fast backend and algorithm against the float64 reference (DESIGN §4)."""

import re

import pytest
import torch

import mmkd_kernels as mk
from mmkd_test_support import (TARGETS, TOLERANCE, ZERO_TRUTH, Target, far_apart, grads_of, leaf, randn, rel_err,
                               runs)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, Ds, Dt): the smallest N each kind allows, odd sizes, widths that differ, N = 1000, and
# N = 1100: past the native tile kernel's 1024-row block, so its column-side gradients cross blocks.
SHAPES = [(2, 7, 1), (2, 7, 3), (3, 1, 7), (4, 3, 5), (17, 64, 7), (17, 384, 384), (19, 768, 40), (130, 100, 48),
          (1000, 64, 48), (257, 384, 96), (1100, 24, 16)]
# Truths that are exactly zero: a normalized width of 1 has no gradient (its similarities are ±1),
# and kl over one other row is 0.
ZERO_TRUTH_SHAPES = {(2, 7, 1), (3, 1, 7), (2, 7, 3)}
CASES = [("mse", "tile"), ("mse", "gram"), ("pearson", "tile"), ("pearson", "gram"), ("kl", "tile")]


def _cpu64(x):
    """The float64 CPU copy the reference gets (a leaf when x records gradients)."""
    y = x.detach().double().cpu()
    return leaf(y) if x.requires_grad else y


def _check(target: Target, s, t, floor=1e-30, **kwargs):
    tol = max(TOLERANCE[s.dtype], TOLERANCE[t.dtype])
    inputs = [x for x in (s, t) if x.requires_grad]
    out = mk.structure_loss(s, t, backend=target.backend, **kwargs)
    s64, t64 = _cpu64(s), _cpu64(t)
    ref = mk.structure_loss(s64, t64, backend="reference", **{k: v for k, v in kwargs.items() if k != "algorithm"})
    wide = torch.promote_types(s.dtype, t.dtype) == torch.float64
    assert out.dim() == 0 and out.dtype == (torch.float64 if wide else torch.float32)
    assert rel_err(out, ref, floor) <= tol, f"loss: {rel_err(out, ref, floor):.2e} > {tol:.0e}"
    # Half-precision gradients of a mean over N² pairs underflow fp16 (~1e-7 at N = 1000): scale the
    # loss as AMP's GradScaler does, and compare the scaled gradients.
    loss_scale = 2.0**12 if {s.dtype, t.dtype} & {torch.float16, torch.bfloat16} else 1.0
    grads = grads_of(out * loss_scale, inputs)
    grads_ref = grads_of(ref * loss_scale, [x for x in (s64, t64) if x.requires_grad])
    for name, x, a, b in zip(("ds", "dt"), inputs, grads, grads_ref):
        assert a.dtype == x.dtype and a.shape == b.shape
        assert rel_err(a, b, floor) <= tol, f"{name}: {rel_err(a, b, floor):.2e} > {tol:.0e}"


# Each kind at the sizes it is defined for (N < MIN_ROWS raises; test_errors.py checks that).
# Pearson at N = 3 correlates two points, r = ±1 whatever the inputs: its gradient is exactly zero,
# which no relative error can check; test_pearson_of_two_points does that case.
DEFINED = [(kind, algorithm, *shape) for kind, algorithm in CASES for shape in SHAPES
           if shape[0] >= mk.functional.MIN_ROWS[kind] and not (kind == "pearson" and shape[0] == 3)]


@pytest.mark.parametrize("target,kind,algorithm,n,ds,dt,dtype", [
    (target, *case, dtype) for target in TARGETS for case in DEFINED for dtype in DTYPES
    if runs(target, dtype, case[2] * case[2] * (case[3] + case[4]))
], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(target, kind, algorithm, n, ds, dt, dtype, seed):
    s = leaf(randn(n, ds, seed=seed, dtype=dtype, device=target.device))
    t = leaf(randn(n, dt, seed=seed + 100, dtype=dtype, device=target.device))
    zero_truth = (n, ds, dt) in ZERO_TRUTH_SHAPES and (kind == "kl" or min(ds, dt) == 1)
    _check(target, s, t, kind=kind, algorithm=algorithm, temperature=0.1, floor=ZERO_TRUTH if zero_truth else 1e-30)


@pytest.mark.parametrize("target,dtype", [(t, dtype) for t in TARGETS for dtype in DTYPES if runs(t, dtype, 0)],
                         ids=str)
@pytest.mark.parametrize("algorithm", ["tile", "gram"])
def test_pearson_of_two_points(target, algorithm, dtype):
    """N = 3: each row has two others, so r_i = ±1, the loss is 0 or 1 or 2 per row, the gradient 0."""
    s = leaf(randn(3, 7, seed=5, dtype=dtype, device=target.device))
    t = leaf(randn(3, 5, seed=6, dtype=dtype, device=target.device))
    out = mk.structure_loss(s, t, kind="pearson", algorithm=algorithm, backend=target.backend)
    ref = mk.structure_loss(_cpu64(s).detach(), _cpu64(t).detach(), kind="pearson", backend="reference")
    assert rel_err(out, ref) <= TOLERANCE[dtype]
    for g in torch.autograd.grad(out, (s, t)):
        assert torch.linalg.vector_norm(g.double()) <= (1e-5 if dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("target,dtype", [(t, dtype) for t in TARGETS for dtype in DTYPES if runs(t, dtype, 0)],
                         ids=str)
@pytest.mark.parametrize("kind,algorithm", CASES)
def test_frozen_teacher_in_every_dtype(target, dtype, kind, algorithm):
    """The trainer's case: only the student's gradient is wanted, which the fused forward computes
    alone (a separate path from the tables' two gradients)."""
    s = leaf(randn(41, 24, seed=12, dtype=dtype, device=target.device))
    t = randn(41, 16, seed=13, dtype=dtype, device=target.device)
    _check(target, s, t, kind=kind, algorithm=algorithm, temperature=0.1)


MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
         (torch.float32, torch.float64)]


@pytest.mark.parametrize("target,dtypes", [
    (t, dtypes) for t in TARGETS for dtypes in MIXED if runs(t, torch.promote_types(*dtypes), 0)
], ids=str)
@pytest.mark.parametrize("kind,algorithm", CASES)
def test_student_and_teacher_of_different_dtypes(target, dtypes, kind, algorithm):
    """Computed in the promoted dtype; each gradient in its input's dtype, the loss float32 (float64
    when either input is)."""
    s = leaf(randn(41, 24, seed=10, dtype=dtypes[0], device=target.device))
    t = leaf(randn(41, 16, seed=11, dtype=dtypes[1], device=target.device))
    _check(target, s, t, kind=kind, algorithm=algorithm, temperature=0.1)
    _check(target, s, t.detach(), kind=kind, algorithm=algorithm, temperature=0.1)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("kind,algorithm", CASES)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("seed", [2, 3])
def test_options(target, kind, algorithm, layout, seed):
    """normalize=False, a frozen teacher, a common offset in the rows, non-contiguous views."""
    device = target.device
    s = leaf(randn(41, 24, seed=seed, layout=layout, device=device))
    t = leaf(randn(41, 13, seed=seed + 100, layout=layout, shift=0.5, device=device))
    _check(target, s * 0.3, t * 0.2, kind=kind, algorithm=algorithm, normalize=False, temperature=0.5)
    _check(target, s, t.detach(), kind=kind, algorithm=algorithm, temperature=1.0)
    offset = leaf(randn(41, 24, seed=seed + 200, layout=layout, shift=3.0, device=device))
    _check(target, offset, t, kind=kind, algorithm=algorithm, temperature=0.2)


def _close_pair(noise, device, n):
    """A student (n, 96) at `noise` from its teacher, both float32."""
    gen = torch.Generator().manual_seed(int(noise * 1000))
    teacher = torch.randn(n, 96, generator=gen)
    return (teacher + noise * torch.randn(n, 96, generator=gen)).to(device), teacher.to(device)


@pytest.mark.parametrize("target", [t for t in TARGETS if runs(t, torch.float16, 0)], ids=str)
@pytest.mark.parametrize("kind", ["pearson", "kl"])
def test_rows_past_int32_offsets(target, kind, cuda_memory_released):
    """Rows 2^25 elements apart, so the last one starts 2^31 elements past the first: Triton's int32
    address math wrapped there (tiles.needs_int64_offsets). The tile kernels, both sides' gradients."""
    s, t = map(leaf, far_apart(65, (40, 24), seed=0, device=target.device))
    _check(target, s, t, kind=kind, algorithm="tile", temperature=0.1)


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_kl_of_a_student_close_to_its_teacher(target):
    """Late in distillation (teacher = student + noise) each row's KL is far smaller than the terms
    of Σ p log(p/q): float32 kept 3e-5 of the loss at noise 0.03 and 1e-3 at noise 0.003 (chunked
    before the centred form; benchmarks/results/accuracy-cpu-*.md has the eager loss at 4.5e-5).
    The centred form keeps float32's tolerance: for the loss and both gradients at noise 0.03, for
    the loss at 0.003 (there the gradients are 8e-5 off: G^S and G^T come from two float32 GEMMs,
    each rounded at about 1e-7 of its entries, which is no longer small next to their difference,
    of the order of the noise). Every backend has it: the whole-row ones (chunked, native on CPU)
    centre on the row's μ, the streaming kernels (Triton, CUDA) on each tile's and merge; under
    Triton's interpreter 240 rows, where the plain form is 1e-4 off at 0.003. At a temperature
    below 1 / KL_CENTRED_MAX_SCALE the plain form serves, and still matches at random inputs."""
    n = 600 if runs(target, torch.float32, 600 * 600 * 192) else 240
    s, t = _close_pair(0.03, target.device, n)
    _check(target, leaf(s), leaf(t), kind="kl", temperature=0.1)
    s, t = _close_pair(0.003, target.device, n)
    out = mk.structure_loss(s, t, kind="kl", temperature=0.1, backend=target.backend)
    ref = mk.structure_loss(s.double().cpu(), t.double().cpu(), kind="kl", temperature=0.1, backend="reference")
    assert rel_err(out, ref) <= TOLERANCE[torch.float32], f"loss at noise 0.003: {rel_err(out, ref):.2e}"
    s, t = leaf(randn(130, 48, seed=3, device=target.device)), leaf(randn(130, 40, seed=4, device=target.device))
    _check(target, s, t, kind="kl", temperature=1 / (2 * mk.chunked.KL_CENTRED_MAX_SCALE))


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("kind,algorithm", [("pearson", "tile"), ("pearson", "gram"), ("mse", "gram")])
def test_structure_of_a_student_close_to_its_teacher(target, kind, algorithm):
    """Late in distillation (noise 0.03) a row's 1 − r is about 1e-3 of the terms it is computed
    from, and mse a small difference of three quadratic forms. The tile path sums each pair's
    centred products; the gram path computes its D×D algebra in float64, because from float32
    quadratic forms the pearson loss came out 1.2e-5 (N = 600) and 3.9e-5 (N = 240) off here, up
    to one rounding of r (eps/(1 − r) ≈ 1e-4 of the loss), and a gradient 1.05e-5. Both keep
    float32's tolerance."""
    n = 600 if runs(target, torch.float32, 600 * 600 * 192) else 240
    s, t = _close_pair(0.03, target.device, n)
    _check(target, leaf(s), leaf(t), kind=kind, algorithm=algorithm)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("kind", ["mse", "pearson"])
def test_gram_on_anisotropic_rows_close_to_their_teacher(target, kind):
    """Rows sharing one large direction (mean cosine 0.999) and a student 3e-3 from its teacher:
    the mse loss is about 1e-12. From uncentred statistics each row's x·A·x, y·B·y and 2x·C·y are
    about N and their difference N·1e-12: in float64 the mse loss came out 1.2e-4 off here. The
    statistics are centred now, for mse as for pearson."""
    n, d = (1000, 64) if runs(target, torch.float32, 1000 * 64 * 64) else (300, 64)
    gen = torch.Generator().manual_seed(30)
    teacher = torch.randn(n, d, generator=gen) + 30 * torch.randn(d, generator=gen)
    student = teacher + 3e-3 * torch.randn(n, d, generator=gen)
    _check(target, leaf(student.to(target.device)), leaf(teacher.to(target.device)), kind=kind, algorithm="gram")


@pytest.mark.parametrize("target", TARGETS + [Target("reference", "cpu")], ids=str)
@pytest.mark.parametrize("kind", ["mse", "pearson", "kl"])
def test_nan_and_inf_inputs_give_nan(target, kind):
    backend = target.backend
    s, t = randn(9, 8, seed=6, device=target.device), randn(9, 5, seed=7, device=target.device)
    s[3, 2] = float("nan")
    assert torch.isnan(mk.structure_loss(s, t, kind=kind, backend=backend))
    s[3, 2] = float("inf")
    assert torch.isnan(mk.structure_loss(s, t, kind=kind, backend=backend))


@pytest.mark.parametrize("backend", [t.backend for t in TARGETS if t.device == "cpu" and runs(t, torch.float64, 0)])
@pytest.mark.parametrize("kind,algorithm", CASES)
def test_gradcheck_float64(backend, kind, algorithm):
    s = leaf(randn(6, 4, seed=8, dtype=torch.float64))
    t = leaf(randn(6, 3, seed=9, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, b: mk.structure_loss(a, b, kind=kind, algorithm=algorithm, temperature=0.5, backend=backend),
        (s, t),
    )


def test_auto_algorithm_counts_flops():
    choose = mk.functional.choose_algorithm
    assert choose("pearson", "auto", 32768, 384, 384) == "gram"
    assert choose("pearson", "auto", 4096, 384, 384) == "gram"
    assert choose("pearson", "auto", 2048, 384, 384) == "tile"  # gram's float64 work counts twice
    assert choose("mse", "auto", 100, 384, 384) == "tile"
    assert choose("kl", "auto", 32768, 384, 384) == "tile"
    assert choose("pearson", "tile", 32768, 384, 384) == "tile"


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("kind", ["mse", "pearson"])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_gram_across_row_blocks(target, kind, teacher_grad, monkeypatch):
    """The gram algorithm sums its statistics, and their gradients, over blocks of rows: 97-row
    blocks (the last one short) give the one-block result, float64 to 1e-12, and the reference's
    to float32's tolerance. The tables' sizes fit in one block of the default size."""
    n, ds, dt = 1000, 64, 48
    s32 = randn(n, ds, seed=21, device=target.device)
    t32 = randn(n, dt, seed=22, device=target.device)
    results = {}
    for elements in (None, str(97 * ds)):
        if elements is None:
            monkeypatch.delenv("MMKD_GRAM_BLOCK_ELEMENTS", raising=False)
        else:
            monkeypatch.setenv("MMKD_GRAM_BLOCK_ELEMENTS", elements)
        if runs(target, torch.float64, 0):
            s, t = leaf(s32.double()), t32.double()
            t = leaf(t) if teacher_grad else t
            out = mk.structure_loss(s, t, kind=kind, algorithm="gram", backend=target.backend)
            results[elements] = [out, *grads_of(out, [x for x in (s, t) if x.requires_grad])]
        _check(target, leaf(s32), leaf(t32) if teacher_grad else t32, kind=kind, algorithm="gram")
    if results:
        for one_block, blocks in zip(results[None], results[str(97 * ds)]):
            assert rel_err(blocks, one_block) <= 1e-12


def test_gram_block_size_from_the_environment(monkeypatch):
    from mmkd_kernels import gram

    x, y = torch.empty(1000, 64), torch.empty(1000, 48)
    monkeypatch.setenv("MMKD_GRAM_BLOCK_ELEMENTS", str(97 * 64))
    blocks = gram._blocks(x, y)
    assert [b.stop - b.start for b in blocks[:-1]] == [97] * 10 and blocks[-1] == slice(970, 1067)
    for bad in ("0", "-5", "lots", "2**20"):
        monkeypatch.setenv("MMKD_GRAM_BLOCK_ELEMENTS", bad)
        with pytest.raises(ValueError, match="MMKD_GRAM_BLOCK_ELEMENTS must be a positive integer.*" + re.escape(repr(bad))):
            mk.structure_loss(torch.randn(50, 8), torch.randn(50, 8), kind="pearson", algorithm="gram",
                              backend="chunked")


@pytest.fixture(scope="module")
def large_n_reference():
    """N = 8192 inputs with a common offset, and each kind's float64 reference loss (computed once)."""
    s = randn(8192, 384, seed=11, shift=0.2)
    t = randn(8192, 384, seed=12, shift=0.2)
    return s, t, {kind: mk.structure_loss(s.double(), t.double(), kind=kind, backend="reference")
                  for kind in ("mse", "pearson", "kl")}


@pytest.mark.slow
@pytest.mark.parametrize("target", [t for t in TARGETS if runs(t, torch.float32, 8192 * 8192 * 768)], ids=str)
@pytest.mark.parametrize("kind", ["mse", "pearson", "kl"])
def test_gram_and_tile_agree_at_large_n(large_n_reference, target, kind):
    """N = 8192, float32: gram vs tile vs float64 reference ≤ 1e-5 (cancellation is real, and so
    is the rounding of float32 row sums over 8K terms: the native kl once missed by 2e-5)."""
    s, t, references = large_n_reference
    ref = references[kind]
    for algorithm in ("gram", "tile") if kind != "kl" else ("tile",):
        out = mk.structure_loss(s.to(target.device), t.to(target.device), kind=kind, algorithm=algorithm,
                                backend=target.backend)
        assert rel_err(out, ref) <= 1e-5, f"{target} {algorithm}: {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("rows,teacher_rows", [((-2, 2), 10), ((5, 6), 10), ((0, -1), 10), ((0, 10), 13)],
                         ids=["negative-start", "past-n", "negative-count", "teacher-of-other-n"])
def test_a_direct_tile_op_call_with_rows_outside_the_inputs_is_refused(target, rows, teacher_rows):
    """The public losses pass rows within N and a teacher of N rows; a direct call of a tile op may
    pass others, which the kernels would read and write outside their tensors for (native's CPU op
    freed an invalid pointer for row_start = -2). Every backend refuses them, naming the rows."""
    from mmkd_kernels import backends

    ops = getattr(torch.ops, backends.NAMESPACES[target.backend])
    s, t = randn(10, 4, seed=51, device=target.device), randn(teacher_rows, 3, seed=52, device=target.device)
    for call in (lambda: ops.structure_tile_forward(s, t, "mse", 1.0, True, *rows),
                 lambda: ops.structure_tile_forward_with_grad(s, t, "mse", 1.0, True, *rows, True, True)):
        with pytest.raises((ValueError, RuntimeError), match=r"rows|same number of rows"):
            call()


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("algorithm", ["tile", "gram"])
def test_pearson_of_large_unnormalized_rows(target, algorithm):
    """Rows of 3e4 without normalization: similarities of 1e10, variances of 1e21, whose product
    overflows float32. The tile kernels took √(var_s·var_t) and read r = 0: a loss of exactly 1 and
    no gradient, where the truth is 1.05. The denominator is now √var_s·√var_t."""
    s = leaf(randn(40, 16, seed=61, device=target.device) * 3e4)
    t = leaf(randn(40, 12, seed=62, device=target.device) * 3e4)
    _check(target, s, t, kind="pearson", algorithm=algorithm, normalize=False)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("rows", [(1, 1), (5, 6)], ids=["one-row", "teacher-of-other-n"])
def test_a_direct_gram_op_call_with_rows_it_cannot_take_is_refused(target, rows):
    """A direct call of a gram op with N = 1 divided by N − 1 (ZeroDivisionError), and one with a
    teacher of other N mixed up the statistics; both are refused, naming the rows."""
    from mmkd_kernels import backends

    ops = getattr(torch.ops, backends.NAMESPACES[target.backend])
    s, t = randn(rows[0], 4, seed=53, device=target.device), randn(rows[1], 3, seed=54, device=target.device)
    for call in (lambda: ops.structure_gram_forward(s, t, "mse", True),
                 lambda: ops.structure_gram_forward_with_grad(s, t, "mse", True, True, True)):
        with pytest.raises((ValueError, RuntimeError), match="same N >= 2 rows"):
            call()
