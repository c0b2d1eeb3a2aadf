"""The CUDA sources of the native backend (csrc/cuda), checked where there is no GPU.

- Every ``csrc/cuda/*.cu`` compiles alone with ``nvcc -arch=sm_90 -std=c++17 -c`` (with the
  half-precision switches torch's extension build adds), as DESIGN §3 asks of them.
- The kernels run on the CPU: the .cu files are compiled as C++ with csrc/cuda/emulation (blocks
  of fibers, barriers, warp shuffles, WMMA emulated; shared memory poisoned with NaN; WMMA
  alignment and barrier divergence checked) and called through their C launchers. The ATen glue
  of csrc/cuda/ops_cuda.cpp is mirrored below in Python, function for function, and each op is
  compared with the chunked backend in float64 on the same rounded inputs (DESIGN §4 tolerances).

- csrc/cuda/ops_cuda.cpp passes the host compiler's full semantic check against torch's headers.

What the emulation cannot check (timing, registers, the tensor cores' own rounding, ops_cuda.cpp
at run time) is owed to a GPU run of the backend tests with backend='native'.
"""

import ctypes
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkd_test_support import TOLERANCE, randn, rel_err
from benchmarks import cuda_sm90
from mmkd_kernels import chunked

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))

def test_there_are_sources():
    assert {f.name for f in CU_FILES} >= {"contrastive.cu", "structure.cu"}


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_alone(source):
    """nvcc -arch=sm_90 -c of the file alone, as benchmarks/cuda_sm90.py reports it: every kernel
    instance's registers are read back (none over the 255 a thread may hold)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on the PATH: the CUDA sources cannot be compiled here")
    result, kernels = cuda_sm90.compile_report(source)
    assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stdout}\n{result.stderr}"
    assert kernels and all(0 < k["registers"] <= 255 and k["blocks_per_sm"] >= 1 for k in kernels), kernels


def test_ops_cuda_glue_compiles_against_torch_headers(tmp_path):
    """csrc/cuda/ops_cuda.cpp (the ATen glue of the CUDA ops) through the host compiler's full
    semantic check, -fsyntax-only: a CPU build of torch ships the c10/cuda headers but not their
    generated cuda_cmake_macros.h, which a one-line stand-in provides."""
    from torch.utils import cpp_extension
    import sysconfig

    compiler, cuda_include = shutil.which("c++"), _cuda_include()
    if compiler is None or cuda_include is None:
        pytest.skip("no host C++ compiler or no CUDA toolkit headers here: ops_cuda.cpp cannot be checked")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(cuda_include)]
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in includes):
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path))
    command = [compiler, "-std=c++17", "-fsyntax-only", *(f"-I{p}" for p in includes), str(CUDA_DIR / "ops_cuda.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"


# --------------------------------------------------------------------------------------------------
# The kernels under CPU emulation
# --------------------------------------------------------------------------------------------------


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h)."""
    candidates = [os.environ.get(name) for name in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def launchers(tmp_path_factory):
    """The C launchers of contrastive.cu and structure.cu, built for CPU emulation (ctypes)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    include = _cuda_include()
    if not sys.platform.startswith("linux") or compiler is None or include is None:
        pytest.skip("the CPU emulation needs Linux (ucontext), a C++ compiler and the CUDA headers")
    library = tmp_path_factory.mktemp("cuda_emulation") / "libmmkd_cuda_emulated.so"
    emulation = CUDA_DIR / "emulation"
    command = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
               "-DMMKD_CPU_EMULATION", f"-I{emulation}", f"-I{include}", "-include", str(emulation / "cuda_emulation.h"),
               "-x", "c++", str(CUDA_DIR / "contrastive.cu"), str(CUDA_DIR / "structure.cu"), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.mmkd_contrastive_lse.argtypes = [i32] + [p] * 9 + [i64] * 7 + [f32, f32, p]
    lib.mmkd_contrastive_lse_grad.argtypes = [i32] + [p] * 8 + [i64] * 7 + [f32, f32, p]
    lib.mmkd_contrastive_grad.argtypes = [i32] + [p] * 13 + [i64] * 7 + [f32, p]
    lib.mmkd_structure_rows.argtypes = [i32, i32] + [p] * 6 + [i64] * 9 + [f32, p]
    lib.mmkd_structure_grad.argtypes = [i32, i32, i32] + [p] * 7 + [i64] * 9 + [f32, p]
    for name in ("mmkd_contrastive_lse", "mmkd_contrastive_lse_grad", "mmkd_contrastive_grad", "mmkd_structure_rows",
                 "mmkd_structure_grad"):
        getattr(lib, name).restype = i32
    return lib


# The Python mirror of csrc/cuda/ops_cuda.cpp: keep the two in step.

EPS = 1e-8
FIXED_SHIFT_MAX = 40.0  # launchers.h MMKD_FIXED_SHIFT_MAX
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KIND_CODES = {"mse": 0, "pearson": 1, "kl": 2}
KL_CENTRED = 3  # launchers.h MMKD_KL_CENTRED, at |scale| <= MMKD_KL_CENTRED_MAX_SCALE
STUDENT, TEACHER = 0, 1


def _ptr(t):
    return None if t is None else t.data_ptr()


# Where a test sets GUARD to "end" (or "start"), every buffer the mirror hands a kernel ends (starts)
# at an inaccessible page: a kernel that reads or writes past that end of it crashes the process
# (SIGSEGV), where on a GPU it would read or overwrite whatever memory lies there.
GUARD = None
_PROT_NONE = 0
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _guard(x):
    """x itself, or where GUARD is set a copy with x's strides in memory fenced by inaccessible pages."""
    if GUARD is None or x is None or x.numel() == 0:
        return x
    elements = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) + 1
    nbytes, page = elements * x.element_size(), mmap.PAGESIZE
    data_pages = -(-nbytes // page)
    region = mmap.mmap(-1, (data_pages + 2) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    for fence in (base, base + (data_pages + 1) * page):
        assert _LIBC.mprotect(fence, page, _PROT_NONE) == 0, os.strerror(ctypes.get_errno())
    offset = (data_pages + 1) * page - nbytes if GUARD == "end" else page
    # frombuffer keeps the mapping alive as long as the tensor.
    fenced = torch.frombuffer(region, dtype=x.dtype, count=elements, offset=offset)
    return fenced.as_strided(x.shape, x.stride()).copy_(x)


def _output(*shape, fill=float("nan")):
    """A float32 buffer for a kernel to write, NaN (unwritten) or ``fill``; fenced where GUARD is set."""
    return _guard(torch.full(shape, fill))


def _check(error, launcher):
    assert error == 0, f"{launcher} returned cudaError {error}"


def _inverse_norms(x, normalize):
    if not normalize:
        return _guard(torch.ones(x.shape[0], dtype=torch.float32))
    return _guard(torch.linalg.vector_norm(x.float(), dim=1).clamp_min_(EPS).reciprocal_())


def _input_grad(d_hat, x, normalize):
    if not normalize:
        return d_hat
    xf = x.float()
    norms = torch.linalg.vector_norm(xf, dim=1).clamp_min_(EPS)
    x_hat = xf / norms[:, None]
    radial = (x_hat * d_hat).sum(1) * (norms > EPS).float()
    return d_hat.sub_(x_hat * radial[:, None]).div_(norms[:, None])


def _lse_by_rows(lib, a, b, inv_a, inv_b, targets, scale, columns=False):
    """(lse, loss, col_lse, col_loss) as ops_cuda.cpp's lse_by_rows; the last two None without columns."""
    lse, loss = _output(a.shape[0]), _output(a.shape[0])
    col_other = _output(b.shape[0], fill=0.0) if columns else None
    col_target = _output(b.shape[0]) if columns else None
    shift = abs(scale)
    _check(lib.mmkd_contrastive_lse(DTYPE_CODES[a.dtype], _ptr(a), _ptr(b), _ptr(inv_a), _ptr(inv_b), _ptr(targets),
                                    _ptr(lse), _ptr(loss), _ptr(col_other), _ptr(col_target), a.shape[0], b.shape[0],
                                    a.shape[1], a.stride(0), a.stride(1), b.stride(0), b.stride(1), scale, shift, None),
           "mmkd_contrastive_lse")
    if not columns:
        return lse, loss, None, None
    shifted_target = col_target - shift
    weight = shifted_target.exp()
    total = weight + col_other
    dominant = weight >= col_other
    col_loss = torch.where(dominant, torch.log1p(col_other / torch.where(dominant, weight, torch.ones_like(weight))),
                           total.log() - shifted_target)
    return lse, loss, total.log() + shift, col_loss


def _lse_grad_by_rows(lib, a, b, inv_a, inv_b, targets, scale):
    lse, loss, da = _output(a.shape[0]), _output(a.shape[0]), _output(*a.shape)
    _check(lib.mmkd_contrastive_lse_grad(DTYPE_CODES[a.dtype], _ptr(a), _ptr(b), _ptr(inv_a), _ptr(inv_b),
                                         _ptr(targets), _ptr(lse), _ptr(loss), _ptr(da), a.shape[0], b.shape[0],
                                         a.shape[1], a.stride(0), a.stride(1), b.stride(0), b.stride(1), scale,
                                         abs(scale), None), "mmkd_contrastive_lse_grad")
    return lse, loss, da


def _one_pass(q, normalize, scale):
    return normalize and abs(scale) <= FIXED_SHIFT_MAX


def _grad_rows(lib, a, b, inv_a, inv_b, a_term, b_term, scale):
    da = _output(*a.shape)
    lse_a, g_a, t_a, tg_a = a_term if a_term is not None else (None,) * 4
    lse_b, g_b, t_b, tg_b = b_term if b_term is not None else (None,) * 4
    _check(lib.mmkd_contrastive_grad(DTYPE_CODES[a.dtype], _ptr(a), _ptr(b), _ptr(inv_a), _ptr(inv_b), _ptr(lse_a),
                                     _ptr(g_a), _ptr(t_a), _ptr(tg_a), _ptr(lse_b), _ptr(g_b), _ptr(t_b), _ptr(tg_b),
                                     _ptr(da), a.shape[0],
                                     b.shape[0], a.shape[1], a.stride(0), a.stride(1), b.stride(0), b.stride(1), scale,
                                     None), "mmkd_contrastive_grad")
    return da


def contrastive_forward(lib, q, k, targets, scale, normalize, symmetric):
    t = _guard(targets.long().contiguous())
    inv_q, inv_k = _inverse_norms(q, normalize), _inverse_norms(k, normalize)
    columns_in_row_pass = (symmetric and normalize and abs(scale) <= FIXED_SHIFT_MAX
                           and not torch.are_deterministic_algorithms_enabled())
    row_lse, row_loss, col_lse, col_loss = _lse_by_rows(lib, q, k, inv_q, inv_k, t, scale, columns_in_row_pass)
    if not symmetric:
        return row_loss, row_lse.new_empty(0), row_lse, row_lse.new_empty(0)
    if not columns_in_row_pass:
        col_lse, col_loss, _, _ = _lse_by_rows(lib, k, q, inv_k, inv_q, _guard(torch.arange(k.shape[0])), scale)
    return row_loss, col_loss, row_lse, col_lse


def _term(lse, grad, targets, loss):
    """A direction's arguments of mmkd_contrastive_grad, as ops_cuda.cpp's make_term."""
    grad = grad.float().contiguous()
    return tuple(_guard(x) for x in (lse.float().contiguous(), grad, targets.long().contiguous(),
                                     (grad * torch.expm1(-loss.float())).contiguous()))


def contrastive_backward(lib, grad_row, grad_col, q, k, targets, row_lse, col_lse, row_loss, col_loss, scale,
                         normalize, symmetric, need_q, need_k):
    inv_q, inv_k = _inverse_norms(q, normalize), _inverse_norms(k, normalize)
    row_term = _term(row_lse, grad_row, targets, row_loss)
    col_term = _term(col_lse, grad_col, torch.arange(k.shape[0]), col_loss) if symmetric else None
    dq, dk = q.new_empty(0), k.new_empty(0)
    if need_q:
        dq = _input_grad(_grad_rows(lib, q, k, inv_q, inv_k, row_term, col_term, scale), q, normalize).to(q.dtype)
    if need_k:
        dk = _input_grad(_grad_rows(lib, k, q, inv_k, inv_q, col_term, row_term, scale), k, normalize).to(k.dtype)
    return dq, dk


def contrastive_forward_with_grad(lib, q, k, targets, scale, normalize, need_q, need_k):
    t = _guard(targets.long().contiguous())
    inv_q, inv_k = _inverse_norms(q, normalize), _inverse_norms(k, normalize)
    fused_q = need_q and _one_pass(q, normalize, scale)
    if fused_q:
        row_lse, row_loss, dq_hat = _lse_grad_by_rows(lib, q, k, inv_q, inv_k, t, scale)
    else:
        row_lse, row_loss, _, _ = _lse_by_rows(lib, q, k, inv_q, inv_k, t, scale)
    row_term = _term(row_lse, torch.ones_like(row_lse), t, row_loss)
    dq, dk = row_lse.new_empty(0), row_lse.new_empty(0)
    if need_q:
        dq = _input_grad(dq_hat if fused_q else _grad_rows(lib, q, k, inv_q, inv_k, row_term, None, scale), q,
                         normalize)
    if need_k:
        dk = _input_grad(_grad_rows(lib, k, q, inv_k, inv_q, None, row_term, scale), k, normalize)
    return row_loss.sum(), dq, dk


def _structure_args(s, t, scale, row_start, row_count):
    return (s.shape[0], row_start, row_count, s.shape[1], t.shape[1], s.stride(0), s.stride(1), t.stride(0),
            t.stride(1), scale, None)


def _kind_code(kind, normalize, scale):
    """As ops_cuda.cpp kind_code: kl takes its centred form for cosine similarities at a bounded scale."""
    if kind == "kl" and normalize and abs(scale) <= chunked.KL_CENTRED_MAX_SCALE:
        return KL_CENTRED
    return KIND_CODES[kind]


def _structure_rows(lib, s, t, inv_s, inv_t, code, scale, row_start, row_count):
    loss, stats = _output(row_count), _output(row_count, 5)
    _check(lib.mmkd_structure_rows(DTYPE_CODES[s.dtype], code, _ptr(s), _ptr(t), _ptr(inv_s), _ptr(inv_t),
                                   _ptr(loss), _ptr(stats), *_structure_args(s, t, scale, row_start, row_count)),
           "mmkd_structure_rows")
    return loss, stats


def _side_grad(lib, s, t, inv_s, inv_t, stats, grad, code, scale, row_start, row_count, side):
    n, d = (s if side == STUDENT else t).shape
    d_hat = _output(n, d)
    _check(lib.mmkd_structure_grad(DTYPE_CODES[s.dtype], code, side, _ptr(s), _ptr(t), _ptr(inv_s),
                                   _ptr(inv_t), _ptr(stats), _ptr(grad), _ptr(d_hat),
                                   *_structure_args(s, t, scale, row_start, row_count)), "mmkd_structure_grad")
    return d_hat


def structure_tile_forward(lib, s, t, kind, scale, normalize, row_start, row_count):
    inv_s, inv_t = _inverse_norms(s, normalize), _inverse_norms(t, normalize)
    return _structure_rows(lib, s, t, inv_s, inv_t, _kind_code(kind, normalize, scale), scale, row_start, row_count)[0]


def structure_tile_forward_with_grad(lib, s, t, kind, scale, normalize, row_start, row_count, need_s, need_t):
    inv_s, inv_t = _inverse_norms(s, normalize), _inverse_norms(t, normalize)
    code = _kind_code(kind, normalize, scale)
    loss, stats = _structure_rows(lib, s, t, inv_s, inv_t, code, scale, row_start, row_count)
    ones = _guard(torch.ones_like(loss))
    ds, dt = loss.new_empty(0), loss.new_empty(0)
    if need_s:
        ds = _input_grad(_side_grad(lib, s, t, inv_s, inv_t, stats, ones, code, scale, row_start, row_count, STUDENT),
                         s, normalize)
    if need_t:
        dt = _input_grad(_side_grad(lib, s, t, inv_s, inv_t, stats, ones, code, scale, row_start, row_count, TEACHER),
                         t, normalize)
    return loss.sum(), ds, dt


# --------------------------------------------------------------------------------------------------
# The comparisons
# --------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _compare(outputs, references, names, dtype):
    tol = TOLERANCE[dtype]
    for name, out, ref in zip(names, outputs, references):
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        if ref.numel():
            assert rel_err(out, ref) <= tol, f"{name}: {rel_err(out, ref):.2e} > {tol:.0e}"


# (N, M, D): single rows, M > N, tails of the 64-row tiles, of the 32-wide D chunks and of the
# 64-wide output chunks, several tiles each way; D = 200 takes the wide gradient blocks (six output
# chunks, two of them past D) and D = 400 two of them (the second holds one chunk).
CONTRASTIVE_SHAPES = [(1, 1, 7), (2, 3, 1), (17, 29, 64), (70, 131, 100), (33, 70, 200), (40, 75, 400)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", CONTRASTIVE_SHAPES)
def test_contrastive_kernels(launchers, dtype, n, m, d):
    q = randn(n, d, seed=n + d, dtype=dtype)
    k = randn(m, d, seed=m + d + 100, dtype=dtype, layout="transposed")
    gen = torch.Generator().manual_seed(n * m)
    targets = torch.randint(0, m, (n,), generator=gen)
    grad_row = torch.rand(n, generator=gen) + 0.5
    q64, k64, scale = q.double(), k.double(), 20.0

    out = contrastive_forward(launchers, q, k, targets, scale, True, False)
    ref = chunked.contrastive_forward(q64, k64, targets, scale, True, False)
    _compare(out, ref, ("row_loss", "col_loss", "row_lse", "col_lse"), dtype)
    assert all(x.dtype == torch.float32 for x in out)

    grads = contrastive_backward(launchers, grad_row, torch.zeros(0), q, k, targets, out[2], out[3], out[0], out[1],
                                 scale, True, False, True, True)
    grads_ref = chunked.contrastive_backward(grad_row.double(), torch.zeros(0, dtype=torch.float64), q64, k64,
                                             targets, ref[2], ref[3], ref[0], ref[1], scale, True, False, True, True)
    _compare(grads, grads_ref, ("dq", "dk"), dtype)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype

    fused = contrastive_forward_with_grad(launchers, q, k, targets, scale, True, True, True)
    fused_ref = chunked.contrastive_forward_with_grad(q64, k64, targets, scale, True, True, True)
    _compare(fused, fused_ref, ("loss_sum", "dq", "dk"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_contrastive_nearly_aligned_pairs_keep_their_digits(launchers, dtype):
    """Student rows close to their teacher's (ℓ ≈ 1e-5, p_target rounds to 1 in float32): the
    losses, the recompute gradients of both directions and the fused gradients stay within the
    dtype's tolerance of float64 (lse − z_t and p_t − 1 would lose most digits; in float16 the
    weights off the target, about e^{−20}·inv_b, would vanish: tiles.cuh Traits). D = 384, where
    inv_b is 1/20: the gradients were 9e-2 off in float16 before its products took TF32."""
    gen = torch.Generator().manual_seed(17)
    k64 = torch.randn(128, 384, generator=gen, dtype=torch.float64)
    q64 = k64 + 0.03 * torch.randn(128, 384, generator=gen, dtype=torch.float64)
    q, k = q64.to(dtype), k64.to(dtype)
    q64, k64 = q.double(), k.double()
    targets, scale = torch.arange(128), 20.0
    # Scaled as a GradScaler that has grown scales the loss: the half-precision gradients the
    # backward returns are then not in float16's subnormals (that rounding is the output's, not the
    # kernels').
    grad_row, grad_col = ((torch.rand(128, generator=gen) + 0.5) * 2.0**12 for _ in range(2))
    out = contrastive_forward(launchers, q, k, targets, scale, True, True)
    ref = chunked.contrastive_forward(q64, k64, targets, scale, True, True)
    assert ref[0].max() < 1e-4  # the regime this test is about
    _compare(out, ref, ("row_loss", "col_loss", "row_lse", "col_lse"), dtype)
    grads = contrastive_backward(launchers, grad_row, grad_col, q, k, targets, out[2], out[3], out[0], out[1],
                                 scale, True, True, True, True)
    grads_ref = chunked.contrastive_backward(grad_row.double(), grad_col.double(), q64, k64, targets, ref[2], ref[3],
                                             ref[0], ref[1], scale, True, True, True, True)
    _compare(grads, grads_ref, ("dq", "dk"), dtype)
    fused = contrastive_forward_with_grad(launchers, q, k, targets, scale, True, True, True)
    fused_ref = chunked.contrastive_forward_with_grad(q64, k64, targets, scale, True, True, True)
    _compare(fused, fused_ref, ("loss_sum", "dq", "dk"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_symmetric_columns_from_the_row_pass(launchers, dtype):
    """The symmetric loss's statistics from one pass under the fixed shift: the rows' and the
    columns' (whose sums three row blocks add into each column) match the float64 truth as the
    pass by columns does. The mirror of ops_cuda.cpp takes this pass unless deterministic
    algorithms are on (as conftest.py turns them on for every test: so here they are switched)."""
    n, d, scale = 150, 40, 20.0
    q = randn(n, d, seed=21, dtype=dtype)
    k = randn(n, d, seed=22, dtype=dtype, layout="transposed")
    own = torch.arange(n)
    inv_q, inv_k = _inverse_norms(q, True), _inverse_norms(k, True)
    ref = chunked.contrastive_forward(q.double(), k.double(), own, scale, True, True)
    one_pass = _lse_by_rows(launchers, q, k, inv_q, inv_k, own, scale, columns=True)
    _compare(one_pass, (ref[2], ref[0], ref[3], ref[1]), ("row_lse", "row_loss", "col_lse", "col_loss"), dtype)
    by_columns = _lse_by_rows(launchers, k, q, inv_k, inv_q, own, scale)
    _compare(by_columns[:2], (ref[3], ref[1]), ("col_lse", "col_loss"), dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        fast = contrastive_forward(launchers, q, k, own, scale, True, True)
        torch.use_deterministic_algorithms(True, warn_only=True)
        deterministic = contrastive_forward(launchers, q, k, own, scale, True, True)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=True)
    assert torch.equal(fast[1], one_pass[3]) and torch.equal(fast[0], one_pass[1])
    assert torch.equal(deterministic[1], by_columns[1]) and torch.equal(deterministic[3], by_columns[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_contrastive_symmetric_and_options(launchers, dtype, normalize):
    """symmetric (both terms of dz), normalize=False, strided views, one gradient at a time."""
    n, d = 67, 40
    q = randn(n, d, seed=3, dtype=dtype, layout="strided")
    k = randn(n, d, seed=4, dtype=dtype, layout="transposed")
    gen = torch.Generator().manual_seed(5)
    grad_row, grad_col = torch.rand(n, generator=gen) - 0.3, torch.rand(n, generator=gen) + 0.5
    targets = torch.arange(n)
    q64, k64 = q.double(), k.double()
    scale = 20.0 if normalize else 0.2  # unnormalized: keep |z| moderate

    out = contrastive_forward(launchers, q, k, targets, scale, normalize, True)
    ref = chunked.contrastive_forward(q64, k64, targets, scale, normalize, True)
    _compare(out, ref, ("row_loss", "col_loss", "row_lse", "col_lse"), dtype)
    for need_q, need_k in ((True, True), (True, False), (False, True)):
        grads = contrastive_backward(launchers, grad_row, grad_col, q, k, targets, out[2], out[3], out[0], out[1],
                                     scale, normalize, True, need_q, need_k)
        grads_ref = chunked.contrastive_backward(grad_row.double(), grad_col.double(), q64, k64, targets, ref[2],
                                                 ref[3], ref[0], ref[1], scale, normalize, True, need_q, need_k)
        _compare(grads, grads_ref, ("dq", "dk"), dtype)
    fused = contrastive_forward_with_grad(launchers, q, k, targets, scale, normalize, False, True)
    fused_ref = chunked.contrastive_forward_with_grad(q64, k64, targets, scale, normalize, False, True)
    _compare(fused, fused_ref, ("loss_sum", "dq", "dk"), dtype)


def test_structure_kl_of_a_student_close_to_its_teacher(launchers):
    """A student at 0.003 from its teacher: each row's KL is below 1e-4, far below the terms of
    Σ p log(p/q) (that form, the launchers' MMKD_KL, is 2e-3 off here). The centred form, which
    kind_code picks for cosine similarities, keeps the loss within float32's tolerance across
    three column tiles merged. (A row alone is 3e-5 off, as chunked's float32 rows are: the
    rounding of G's float32 dot products is no longer small next to G^S − G^T.) At 0.03 the
    gradients too, whose dG^S = scale·p·expm1(x − KL) takes expm1 of small arguments: there that
    rounding is the limit (chunked in float32 is 1.1e-5 off), and the kernels must match it."""
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(150, 96, generator=gen)
    s = t + 0.003 * torch.randn(150, 96, generator=gen)
    rows = structure_tile_forward(launchers, s, t, "kl", 10.0, True, 0, 150)
    rows_ref = chunked.structure_tile_forward(s.double(), t.double(), "kl", 10.0, True, 0, 150)
    assert rows_ref.max() < 1e-4  # the regime this test is about
    _compare([rows.sum()], [rows_ref.sum()], ["loss"], torch.float32)
    s = t + 0.03 * torch.randn(150, 96, generator=gen)
    fused = structure_tile_forward_with_grad(launchers, s, t, "kl", 10.0, True, 0, 150, True, True)
    fused_ref = chunked.structure_tile_forward_with_grad(s.double(), t.double(), "kl", 10.0, True, 0, 150, True, True)
    whole_rows = chunked.structure_tile_forward_with_grad(s, t, "kl", 10.0, True, 0, 150, True, True)
    for name, out, row_out, ref in zip(("loss_sum", "ds", "dt"), fused, whole_rows, fused_ref):
        bound = max(TOLERANCE[torch.float32], 1.25 * rel_err(row_out, ref))
        assert bound <= 2e-5, f"{name}: chunked's float32 error {rel_err(row_out, ref):.2e} grew; the bound follows it"
        assert rel_err(out, ref) <= bound, f"{name}: {rel_err(out, ref):.2e} > {bound:.2e}"


# (N, Ds, Dt, row_start, row_count): the smallest N of each kind, widths 1 .. 400 that differ,
# row ranges that start and end inside tiles (the tile path across ranks), several tiles; Dt = 130
# takes the wide gradient blocks (three of six output chunks used), Ds = 400 two of them.
STRUCTURE_SHAPES = [(2, 7, 1, 0, 2), (5, 1, 7, 0, 5), (17, 64, 7, 0, 17), (70, 33, 65, 3, 60), (130, 100, 48, 40, 70),
                    (70, 400, 130, 3, 60)]
# Cases are left out, not skipped: pearson needs N >= 4 here (with 2 columns per row r = ±1 exactly
# and its gradient is rounding noise), and the emulation is slow, so the largest shape runs in
# float32 only.
STRUCTURE_CASES = [
    (dtype, kind, *shape) for dtype in DTYPES for kind in ("mse", "pearson", "kl") for shape in STRUCTURE_SHAPES
    if not (kind == "pearson" and shape[0] < 4) and not (dtype != torch.float32 and shape[0] > 100)
]


@pytest.mark.parametrize("dtype,kind,n,ds,dt,row_start,row_count", STRUCTURE_CASES, ids=str)
def test_structure_kernels(launchers, dtype, kind, n, ds, dt, row_start, row_count):
    s = randn(n, ds, seed=n + ds, dtype=dtype, layout="strided")
    t = randn(n, dt, seed=n + dt + 100, dtype=dtype, layout="transposed")
    s64, t64, scale = s.double(), t.double(), 2.0

    rows = structure_tile_forward(launchers, s, t, kind, scale, True, row_start, row_count)
    rows_ref = chunked.structure_tile_forward(s64, t64, kind, scale, True, row_start, row_count)
    _compare([rows], [rows_ref], ["per-row losses"], dtype)

    fused = structure_tile_forward_with_grad(launchers, s, t, kind, scale, True, row_start, row_count, True, True)
    fused_ref = chunked.structure_tile_forward_with_grad(s64, t64, kind, scale, True, row_start, row_count, True, True)
    _compare(fused, fused_ref, ("loss_sum", "ds", "dt"), dtype)
    assert all(x.dtype == torch.float32 for x in fused)


@pytest.mark.parametrize("kind", ["mse", "pearson", "kl"])
def test_structure_unnormalized_one_side(launchers, kind):
    n, ds, dt = 45, 20, 12
    s = randn(n, ds, seed=7) * 0.3
    t = randn(n, dt, seed=8) * 0.3
    for need_s, need_t in ((True, False), (False, True)):
        fused = structure_tile_forward_with_grad(launchers, s, t, kind, 1.5, False, 0, n, need_s, need_t)
        fused_ref = chunked.structure_tile_forward_with_grad(s.double(), t.double(), kind, 1.5, False, 0, n, need_s,
                                                             need_t)
        _compare(fused, fused_ref, ("loss_sum", "ds", "dt"), torch.float32)
        assert fused[1].numel() == (s.numel() if need_s else 0) and fused[2].numel() == (t.numel() if need_t else 0)


def test_pearson_of_large_unnormalized_rows(launchers):
    """Variances of 1e21 (rows of 3e4, unnormalized), whose product overflows float: the kernels take
    √var_s·√var_t (with var_s·var_t, r read 0, the loss 1 and the gradient 0)."""
    s, t = randn(40, 16, seed=61) * 3e4, randn(40, 12, seed=62) * 3e4
    fused = structure_tile_forward_with_grad(launchers, s, t, "pearson", 1.0, False, 0, 40, True, True)
    fused_ref = chunked.structure_tile_forward_with_grad(s.double(), t.double(), "pearson", 1.0, False, 0, 40, True,
                                                         True)
    _compare(fused, fused_ref, ("loss_sum", "ds", "dt"), torch.float32)


def test_nan_propagates(launchers):
    q, k = randn(20, 9, seed=9), randn(20, 9, seed=10)
    q[3, 4] = float("nan")
    row_loss, col_loss, _, _ = contrastive_forward(launchers, q, k, torch.arange(20), 5.0, True, True)
    assert row_loss[3].isnan() and torch.isfinite(row_loss[torch.arange(20) != 3]).all()
    assert col_loss.isnan().all()
    for kind in ("mse", "pearson", "kl"):
        assert structure_tile_forward(launchers, q, k, kind, 1.0, True, 0, 20)[3].isnan()


@pytest.mark.parametrize("bad", [-1, 29], ids=["minus-one", "past-the-end"])
def test_a_target_outside_the_teacher_rows_gives_nan_not_a_stray_read(launchers, monkeypatch, bad):
    """The kernels index the teacher by target (lse_grad_kernel reads inv_b and B at it): one outside
    [0, M), from a direct call of the op, read before or past B. Its row's loss and gradient are NaN
    now, the other rows unchanged; every buffer fenced (GUARD) at its end, then its start."""
    q, k = randn(17, 24, seed=31), randn(29, 24, seed=32)
    good = torch.arange(17)
    targets = good.clone()
    targets[5] = bad
    others = good != 5
    for side in ("end", "start"):
        monkeypatch.setattr(sys.modules[__name__], "GUARD", side)
        for scale in (10.0, 100.0):  # the fixed shift's gradient kernel, and the rows' pass then the gradient
            loss, dq, _ = contrastive_forward_with_grad(launchers, q, k, targets, scale, True, True, False)
            _, want_dq, _ = contrastive_forward_with_grad(launchers, q, k, good, scale, True, True, False)
            row_loss = contrastive_forward(launchers, q, k, targets, scale, True, False)[0]
            want_loss = contrastive_forward(launchers, q, k, good, scale, True, False)[0]
            assert loss.isnan() and row_loss[5].isnan() and torch.equal(row_loss[others], want_loss[others])
            if scale <= FIXED_SHIFT_MAX:  # one kernel: loss and gradient of the row from the same pass
                assert dq[5].isnan().all() and torch.equal(dq[others], want_dq[others])


def test_launchers_refuse_bad_arguments_and_skip_empty_work(launchers):
    lib, invalid = launchers, 1  # cudaErrorInvalidValue
    none = [None] * 5
    # n_a = 0: nothing to launch. A bad dtype, a half-given gradient term: refused.
    assert lib.mmkd_contrastive_lse(0, *none, None, None, None, None, 0, 5, 3, 3, 1, 3, 1, 1.0, 0.0, None) == 0
    assert lib.mmkd_contrastive_lse(3, *none, None, None, None, None, 0, 5, 3, 3, 1, 3, 1, 1.0, 0.0, None) == invalid
    # Column sums: both outputs or neither, a square z, a shift within MMKD_FIXED_SHIFT_MAX.
    col = torch.zeros(5)
    for col_other, col_target, n_a, shift in ((_ptr(col), None, 5, 1.0), (_ptr(col), _ptr(col), 4, 1.0),
                                              (_ptr(col), _ptr(col), 5, FIXED_SHIFT_MAX * 1.01)):
        assert lib.mmkd_contrastive_lse(0, *none, None, None, col_other, col_target, n_a, 5, 3, 3, 1, 3, 1, 1.0, shift,
                                        None) == invalid
    # The one-pass gradient: a bad dtype, a shift past MMKD_FIXED_SHIFT_MAX (or NaN) refused.
    lse_grad_args = (*none, None, None, None, 4, 5, 3, 3, 1, 3, 1, 1.0)
    assert lib.mmkd_contrastive_lse_grad(3, *lse_grad_args, 1.0, None) == invalid
    assert lib.mmkd_contrastive_lse_grad(0, *lse_grad_args, FIXED_SHIFT_MAX * 1.01, None) == invalid
    assert lib.mmkd_contrastive_lse_grad(0, *lse_grad_args, float("nan"), None) == invalid
    assert lib.mmkd_contrastive_lse_grad(0, *none, None, None, None, 0, 5, 3, 3, 1, 3, 1, 1.0, 1.0, None) == 0
    lse = torch.zeros(4)
    assert lib.mmkd_contrastive_grad(0, *none, _ptr(lse), *([None] * 7), 4, 5, 3, 3, 1, 3, 1, 1.0, None) == invalid
    # A side without rows: its term is off whatever its pointers (torch gives empty tensors NULL,
    # a caller's own buffers need not).
    q, k = randn(0, 3, seed=13), randn(6, 3, seed=14)
    dk = torch.empty(6, 3)
    stray = _ptr(torch.zeros(1))  # the empty side's lse pointer, its others NULL
    assert lib.mmkd_contrastive_grad(0, _ptr(k), _ptr(q), _ptr(torch.ones(6)), None, *([None] * 4), stray, None, None,
                                     None, _ptr(dk), 6, 0, 3, 3, 1, 3, 1, 1.0, None) == 0
    assert torch.equal(dk, torch.zeros(6, 3))
    # A bad kind or side, rows outside [0, n), the centred kl past its largest scale (or at NaN).
    assert lib.mmkd_structure_rows(0, 4, *none, None, 5, 0, 0, 1, 1, 1, 1, 1, 1, 1.0, None) == invalid
    for scale in (chunked.KL_CENTRED_MAX_SCALE * 1.01, float("nan")):
        assert lib.mmkd_structure_rows(0, KL_CENTRED, *none, None, 5, 0, 0, 1, 1, 1, 1, 1, 1, scale, None) == invalid
        assert lib.mmkd_structure_grad(0, KL_CENTRED, 0, *none, None, None, 5, 0, 0, 1, 1, 1, 1, 1, 1, scale,
                                       None) == invalid
    assert lib.mmkd_structure_rows(0, 0, *none, None, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, None) == invalid
    assert lib.mmkd_structure_grad(0, 0, 2, *none, None, None, 5, 0, 5, 1, 1, 1, 1, 1, 1, 1.0, None) == invalid
    # row_count = 0: the gradient is still written (zeros).
    s, t = randn(10, 4, seed=11), randn(10, 3, seed=12)
    d_hat = _side_grad(lib, s, t, torch.ones(10), torch.ones(10), torch.zeros(0, 5), torch.zeros(0),
                       KIND_CODES["pearson"], 1.0, 4, 0, STUDENT)
    assert torch.equal(d_hat, torch.zeros(10, 4))


# --------------------------------------------------------------------------------------------------
# What a GPU would show and the emulation's one-block-at-a-time run hides. The blocks run first to
# last, or last to first (MMKD_EMULATION_BLOCK_ORDER=reverse): a kernel whose results depend on the
# order of its blocks (one reads what another writes, or two write one place) gives other numbers
# in one order than in the other; a GPU runs them at once, in any order. And every buffer fenced
# (GUARD): an access past a buffer crashes instead of reading whatever memory lies there.
# --------------------------------------------------------------------------------------------------

# N = 150 rows: three row blocks of 64; D = 400 (student) two groups of output chunks; Dt = 130.
ORDER_N, ORDER_M, ORDER_D, ORDER_DT = 150, 170, 400, 130


def _order_cases(lib, dtype):
    """name → a call returning its outputs, each case with several blocks along each grid axis."""
    q = _guard(randn(ORDER_N, ORDER_D, seed=31, dtype=dtype))
    k = _guard(randn(ORDER_M, ORDER_D, seed=32, dtype=dtype, layout="transposed"))
    square = _guard(randn(ORDER_N, ORDER_D, seed=33, dtype=dtype))
    t = _guard(randn(ORDER_N, ORDER_DT, seed=34, dtype=dtype, layout="strided"))
    gen = torch.Generator().manual_seed(35)
    targets, own = torch.randint(0, ORDER_M, (ORDER_N,), generator=gen), _guard(torch.arange(ORDER_N))
    grads = torch.rand(ORDER_N, generator=gen), torch.rand(ORDER_N, generator=gen)

    def backward(a, b, tgt, symmetric):
        saved = contrastive_forward(lib, a, b, tgt, 20.0, True, symmetric)
        grad_col = grads[1] if symmetric else torch.zeros(0)
        return contrastive_backward(lib, grads[0], grad_col, a, b, tgt, saved[2], saved[3], saved[0], saved[1], 20.0,
                                    True, symmetric, True, True)

    return {
        "contrastive forward": lambda: contrastive_forward(lib, q, k, targets, 20.0, True, False),
        "contrastive backward": lambda: backward(q, k, targets, False),
        "contrastive forward with gradients": lambda: contrastive_forward_with_grad(lib, q, k, targets, 20.0, True,
                                                                                    True, True),
        "symmetric forward, one pass": lambda: _lse_by_rows(lib, q, square, _inverse_norms(q, True),
                                                            _inverse_norms(square, True), own, 20.0, columns=True),
        "symmetric backward": lambda: backward(q, square, own, True),
        "structure pearson": lambda: structure_tile_forward_with_grad(lib, q, t, "pearson", 2.0, True, 3, 130, True,
                                                                      True),
        "structure kl": lambda: structure_tile_forward_with_grad(lib, q, t, "kl", 2.0, True, 3, 130, True, True),
    }


# The one-pass symmetric statistics' column sums are atomic adds: their order, and so their
# rounding, follows the blocks'. Everything else must match bit for bit.
ATOMIC_OUTPUTS = {("symmetric forward, one pass", 2), ("symmetric forward, one pass", 3)}


# The cases in float32, and the half-precision tile paths (their own kernel instances) in two.
ORDER_CASES = [(case, torch.float32) for case in (
    "contrastive forward", "contrastive backward", "contrastive forward with gradients", "symmetric forward, one pass",
    "symmetric backward", "structure pearson", "structure kl")] + [
    ("symmetric backward", torch.float16), ("structure kl", torch.bfloat16)]
ORDER_IDS = [f"{case}-{str(dtype).split('.')[-1]}" for case, dtype in ORDER_CASES]


@pytest.mark.parametrize("case,dtype", ORDER_CASES, ids=ORDER_IDS)
def test_results_do_not_depend_on_the_order_of_the_blocks(launchers, monkeypatch, case, dtype):
    call = _order_cases(launchers, dtype)[case]
    monkeypatch.setenv("MMKD_EMULATION_BLOCK_ORDER", "forward")
    first_to_last = call()
    monkeypatch.setenv("MMKD_EMULATION_BLOCK_ORDER", "reverse")
    last_to_first = call()
    for index, (one, other) in enumerate(zip(first_to_last, last_to_first)):
        if (case, index) in ATOMIC_OUTPUTS:
            assert rel_err(other, one) <= 1e-6, f"output {index}: {rel_err(other, one):.1e}"
        else:
            assert torch.equal(one, other), f"output {index} depends on the order of the blocks"


@pytest.mark.parametrize("case,dtype", ORDER_CASES, ids=ORDER_IDS)
def test_kernels_stay_within_their_buffers(launchers, monkeypatch, case, dtype):
    """Every buffer a kernel is handed, inputs and outputs, fenced by an inaccessible page right
    after its end, then right before its start (GUARD): a kernel that reads or writes past either
    crashes the process. Both runs give the same results, bit for bit."""
    results = []
    for side in ("end", "start"):
        monkeypatch.setattr(sys.modules[__name__], "GUARD", side)
        results.append(_order_cases(launchers, dtype)[case]())
    for index, (one, other) in enumerate(zip(*results)):
        assert torch.equal(one, other), f"output {index}"


_FENCE_PROBE = """
import ctypes, sys, torch
sys.path[:0] = sys.argv[5:]
import test_cuda_sources as cuda_sources
which, n = int(sys.argv[3]), int(sys.argv[4])
cuda_sources.GUARD = sys.argv[2] if sys.argv[2] != "none" else None
data, out = cuda_sources._guard(torch.arange(4, dtype=torch.float32)), torch.zeros(8)
toy = ctypes.CDLL(sys.argv[1]).run_toy
toy.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
print("launching", flush=True)
print(toy(which, data.data_ptr(), out.data_ptr(), n))
"""


_RACY_KERNELS = r"""
// Block b stores b into out[0]: the last block to run wins.
__global__ void last_writer_wins(float* data, float* out, int n) {
  if (threadIdx.x == 0) out[0] = static_cast<float>(blockIdx.x);
}

// Block b writes data[b], then reads data[b + 1], which the next block writes.
__global__ void reads_the_next_block(float* data, float* out, int n) {
  if (threadIdx.x == 0) {
    data[blockIdx.x] = 100.0f + blockIdx.x;
    out[blockIdx.x] = data[(blockIdx.x + 1) % n];
  }
}

// Each block its own element: no race (and past the data where the grid has more blocks than it).
__global__ void own_element(float* data, float* out, int n) {
  if (threadIdx.x == 0) out[blockIdx.x] = 2.0f * data[blockIdx.x];
}

// Block b reads element b - 1: block 0 reads the one before the data.
__global__ void previous_element(float* data, float* out, int n) {
  if (threadIdx.x == 0) out[blockIdx.x] = data[static_cast<int>(blockIdx.x) - 1];
}

extern "C" int run_toy(int which, float* data, float* out, int n) {
  void (*const kernels[])(float*, float*, int) = {last_writer_wins, reads_the_next_block, own_element,
                                                   previous_element};
  return mmkd_emulation::launch(kernels[which], dim3(n), 32, 0, data, out, n);
}
"""


@pytest.fixture(scope="module")
def toy_library(launchers, tmp_path_factory):
    """_RACY_KERNELS built for the emulation, as the launchers are (their fixture says where it can)."""
    directory = tmp_path_factory.mktemp("toy_kernels")
    source, library = directory / "racy.cu", directory / "libracy.so"
    source.write_text(_RACY_KERNELS)
    emulation = CUDA_DIR / "emulation"
    command = [shutil.which("g++") or shutil.which("c++"), "-std=c++17", "-O1", "-shared", "-fPIC",
               "-DMMKD_CPU_EMULATION", f"-I{emulation}", f"-I{_cuda_include()}", "-include",
               str(emulation / "cuda_emulation.h"), "-x", "c++", str(source), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return library


def test_the_fence_stops_a_read_past_the_end(toy_library):
    """Toy kernels reading one element past a fenced buffer's end, or one before its start, crash
    their process (a process of its own here) once launched; past a plain buffer they read on, as a
    GPU would, and nothing shows; within a fenced buffer they run."""
    tests, root = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
    # (guard, toy kernel, blocks over the four elements, crashes): own_element is 2, previous_element 3.
    for guard, which, n, crashes in (("none", 2, 5, False), ("end", 2, 4, False), ("end", 2, 5, True),
                                     ("none", 3, 4, False), ("start", 3, 4, True)):
        run = subprocess.run([sys.executable, "-c", _FENCE_PROBE, str(toy_library), guard, str(which), str(n),
                              str(tests), str(root)], capture_output=True, text=True, timeout=300)
        assert run.stdout.startswith("launching"), (guard, which, n, run.stderr[-2000:])
        if crashes:
            assert run.returncode == -11, (guard, which, run.returncode, run.stderr[-2000:])  # SIGSEGV
        else:
            assert run.returncode == 0 and run.stdout.split()[-1] == "0", (guard, which, n, run.stderr[-2000:])


def test_the_block_order_shows_races_between_blocks(toy_library, monkeypatch):
    """Toy kernels whose blocks race give other numbers last to first than first to last; one
    whose blocks keep to their own elements does not; an unknown order fails the launch."""
    toy = ctypes.CDLL(str(toy_library)).run_toy
    toy.argtypes, toy.restype = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int

    def run(which, order):
        monkeypatch.setenv("MMKD_EMULATION_BLOCK_ORDER", order)
        data, out = torch.arange(4, dtype=torch.float32), torch.zeros(4)
        assert toy(which, data.data_ptr(), out.data_ptr(), 4) == 0
        return out

    for racy in (0, 1):
        assert not torch.equal(run(racy, "forward"), run(racy, "reverse")), f"toy kernel {racy}"
    assert torch.equal(run(2, "forward"), run(2, "reverse"))
    monkeypatch.setenv("MMKD_EMULATION_BLOCK_ORDER", "sideways")
    assert toy(2, torch.zeros(4).data_ptr(), torch.zeros(4).data_ptr(), 4) != 0
