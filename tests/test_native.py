"""The native extension: its C++ schemas are the shared ones, and a missing build says why."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmkd_kernels as mk
from mmkd_kernels import native, native_build, ops


def test_the_extension_is_built_here():
    """make test builds mmkd_kernels._C first; every native case of the shared tables needs it."""
    from mmkd_kernels import backends

    assert "native" in mk.available_backends(), backends.unavailable_reason("native")


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_schemas_match_the_python_contract(name):
    """csrc/bindings.cpp defines five ops in C++; native.py the gram ones; all seven as ops.SCHEMAS."""
    expected = torch._C.parse_schema(f"mmkd_native::{name}{ops.SCHEMAS[name]}")
    actual = getattr(torch.ops.mmkd_native, name).default._schema
    assert str(actual) == str(expected)


def test_cpu_kernels_are_registered_for_cpu():
    for name in ("contrastive_forward", "contrastive_backward", "contrastive_forward_with_grad",
                 "structure_tile_forward", "structure_tile_forward_with_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkd_native::{name}", "CPU"), name


@pytest.mark.skipif(not Path("/proc/self/maps").exists(),
                    reason="reads the loaded libraries from /proc/self/maps (Linux)")
def test_the_extension_shares_torchs_openmp_runtime():
    """csrc/cpu/common.h refuses a build without OpenMP, where at::parallel_for runs on one thread.
    The extension links libgomp.so.1 by soname, which must resolve to the runtime torch loaded:
    a second one would keep a second pool of threads spinning beside torch's. In a fresh process
    that loads torch and the extension only: this one has loaded whatever the other tests import
    (transformers 5.17 imports scikit-learn, which brings its own libgomp under another name)."""
    probe = ("import mmkd_kernels as mk; from pathlib import Path; from mmkd_kernels import native; "
             "assert native.load(build=False) is None, native.load(build=False); "
             "print(sorted({l.split()[-1] for l in Path('/proc/self/maps').read_text().splitlines() "
             "if any(n in l for n in ('libgomp', 'libiomp', 'libomp'))}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    runtimes = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert len(runtimes) == 1, runtimes


def test_a_build_without_sources_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "CSRC", tmp_path / "missing")
    with pytest.raises(RuntimeError, match=r"mmkd_kernels._C is not built and its sources are not at .*missing"):
        native._jit_build()


def test_a_cuda_toolkit_needs_its_runtime_headers(monkeypatch, tmp_path):
    """MMKD_BUILD_CUDA=auto builds the CUDA kernels only where cuda_runtime.h is where torch's build
    looks: CUDA_HOME/include, or CUDA_INC_PATH."""
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)
    assert "no CUDA toolkit found" in native_build.cuda_toolkit_missing(None)
    assert "has no include/cuda_runtime.h" in native_build.cuda_toolkit_missing(str(tmp_path))
    headers = tmp_path / "targets" / "x86_64-linux" / "include"
    headers.mkdir(parents=True)
    (headers / "cuda_runtime.h").write_text("")
    assert native_build.cuda_toolkit_missing(str(tmp_path)) is not None
    monkeypatch.setenv("CUDA_INC_PATH", str(headers))
    assert native_build.cuda_toolkit_missing(str(tmp_path)) is None
    monkeypatch.delenv("CUDA_INC_PATH")
    (tmp_path / "include").symlink_to(headers)
    assert native_build.cuda_toolkit_missing(str(tmp_path)) is None


def test_build_cuda_switch_is_one_decision_for_setup_and_the_jit_build(monkeypatch, tmp_path):
    """MMKD_BUILD_CUDA decides both builds (the just-in-time one used to ignore it): 0 never, 1 or
    an error naming the cause (a CPU-only torch used to be blamed on a missing toolkit), auto when it
    can, saying why not."""
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    toolkit = str(tmp_path)
    choice = native_build.cuda_choice
    assert choice("2.13.0+cpu", None, toolkit, switch="0") == (False, None)
    assert choice("2.11.0+cu130", "13.0", toolkit, switch="1") == (True, None)
    assert choice("2.11.0+cu130", "13.0", toolkit, switch="auto") == (True, None)
    with pytest.raises(ValueError, match=r"MMKD_BUILD_CUDA=1: torch 2.13.0\+cpu is a CPU-only build"):
        choice("2.13.0+cpu", None, toolkit, switch="1")
    with pytest.raises(ValueError, match="MMKD_BUILD_CUDA=1: no CUDA toolkit found"):
        choice("2.11.0+cu130", "13.0", None, switch="1")
    with pytest.raises(ValueError, match="MMKD_BUILD_CUDA must be 0, 1 or auto, got 'yes'"):
        choice("2.11.0+cu130", "13.0", toolkit, switch="yes")
    assert choice("2.13.0+cpu", None, toolkit, switch="auto") == (
        False, "building the CPU kernels only: torch 2.13.0+cpu is a CPU-only build (torch.version.cuda is None)")
    assert choice("2.11.0+cu130", "13.0", toolkit, gpu_present=False, switch="auto") == (
        False, "building the CPU kernels only: no GPU is present to run them")
    monkeypatch.setenv("MMKD_BUILD_CUDA", "0")
    assert choice("2.11.0+cu130", "13.0", toolkit) == (False, None)


def test_the_jit_build_takes_mmkd_cuda_arch_for_its_own_build(monkeypatch):
    """MMKD_CUDA_ARCH (default: the GPU's, else 9.0+PTX) replaces an inherited TORCH_CUDA_ARCH_LIST for
    the build (an image's list of many architectures would multiply its time), and the process's is
    restored."""
    import os

    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setattr(native_build, "cuda_choice", lambda *args, **kwargs: (True, None))
    monkeypatch.setattr(cpp_extension, "load",
                        lambda **kw: seen.update(arch=os.environ.get("TORCH_CUDA_ARCH_LIST"), sources=kw["sources"]))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0 8.0 8.6 9.0")
    monkeypatch.delenv("MMKD_CUDA_ARCH", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    native._jit_build()
    assert seen["arch"] == "9.0+PTX" and any(name.endswith(".cu") for name in seen["sources"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 6))
    native._jit_build()
    assert seen["arch"] == "8.6"  # the GPU it will run on
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.0 8.0 8.6 9.0"
    monkeypatch.setenv("MMKD_CUDA_ARCH", "8.0")
    native._jit_build()
    assert seen["arch"] == "8.0"


def test_an_unbuilt_extension_is_looked_for_once(monkeypatch):
    """Asked again (by backend="auto", inside a function torch.compile traces), the answer that the
    extension is not built comes from memory: an import there fails the trace under fullgraph."""
    monkeypatch.setattr(native, "_state", {})
    imports = []

    def missing(name):
        imports.append(name)
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(native.importlib, "import_module", missing)
    first, second = native.load(build=False), native.load(build=False)
    assert first == second and "is not built" in first and imports == ["mmkd_kernels._C"]


def test_the_source_digest_covers_what_each_build_reads(tmp_path):
    """Names and bytes of every file the build of each kind compiles or includes: an edit there gives
    another digest; an edit of a file it never reads (the CUDA emulation, compiled by tests only;
    any CUDA file, for the CPU build) the same; a copy elsewhere the same."""
    import shutil

    copy = tmp_path / "csrc"
    shutil.copytree(native_build.CSRC, copy)
    cpu, cuda = native_build.source_digest(False, copy), native_build.source_digest(True, copy)
    assert (cpu, cuda) == (native_build.source_digest(False), native_build.source_digest(True))
    assert cpu.startswith("cpu_") and cuda.startswith("cuda_") and len(cpu) == 4 + 64
    (copy / "cuda" / "emulation" / "mma.h").write_text("// edited\n", encoding="utf-8")
    assert (native_build.source_digest(False, copy), native_build.source_digest(True, copy)) == (cpu, cuda)
    for edited, changes_cpu in (("cpu/common.h", True), ("bindings.cpp", True), ("cuda/tiles.cuh", False),
                                ("cuda/ops_cuda.cpp", False)):
        path = copy / edited
        original = path.read_bytes()
        path.write_bytes(original + b" ")
        assert (native_build.source_digest(False, copy) != cpu) == changes_cpu, edited
        assert native_build.source_digest(True, copy) != cuda, edited
        path.write_bytes(original)
    (copy / "cpu" / "common.h").rename(copy / "cpu" / "common2.h")
    assert native_build.source_digest(False, copy) != cpu


def test_the_built_extension_holds_the_digest_of_its_sources(tmp_path):
    """make rebuilds on csrc/ edits; the digest in the library is how a build made otherwise is caught."""
    import mmkd_kernels._C as extension

    built = native_build.built_digest(Path(extension.__file__))
    assert built == native_build.source_digest(with_cuda=native.has_cuda_kernels())
    assert native_build.digest_is_current(built) and extension.source_digest == built
    older = tmp_path / "_C.so"
    older.write_bytes(b"\x7fELF no digest here")
    assert native_build.built_digest(older) is None and not native_build.digest_is_current(None)
    older.write_bytes(b"\x7fELF" + native_build.DIGEST_MARKER + b"cpu_" + b"0" * 64 + b"\0")
    assert native_build.built_digest(older) == "cpu_" + "0" * 64
    assert not native_build.digest_is_current("cpu_" + "0" * 64)


_STALE_PROBE = """
import sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mmkd_kernels as mk
from mmkd_kernels import backends, native
assert mk.__file__.startswith(sys.argv[1]), mk.__file__  # the copy, not the checkout
assert "mmkd_kernels._C" not in sys.modules
assert [str(w.message) for w in caught if "out of date" in str(w.message)], [str(w.message) for w in caught]
print(backends.unavailable_reason("native"))
import torch
assert backends.resolve("auto", torch.device("cpu")) == "chunked"
def build():
    raise RuntimeError("the just-in-time build ran")
native._jit_build = build
try:
    backends.resolve("native", torch.device("cpu"))
except ValueError as error:
    print(error)
"""


def test_an_extension_built_from_older_sources_is_not_loaded(tmp_path):
    """A copy of the package with its built extension, and csrc/ edited since: the extension is left
    unloaded (its ops would register for the whole process), a warning and the backend's reason say
    so, auto takes chunked, and asking for native by name builds the current sources just in time."""
    import shutil

    import mmkd_kernels._C as extension

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "mmkd_kernels", tmp_path / "mmkd_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    assert Path(extension.__file__).name in {p.name for p in (tmp_path / "mmkd_kernels").iterdir()}
    with open(tmp_path / "csrc" / "cpu" / "common.h", "a", encoding="utf-8") as header:
        header.write("// an edit after the build\n")
    done = subprocess.run([sys.executable, "-c", _STALE_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    reason, built = done.stdout.strip().splitlines()[-2:]
    assert reason.startswith("backend='native' is out of date: ") and "was built from other sources than" in reason
    assert "make native" in reason
    assert built == "backend='native' could not be built just in time: RuntimeError: the just-in-time build ran"


def _contrastive_calls(q, k, t):
    """Direct calls of the native contrastive ops (forward, forward with gradients, backward)."""
    ops = torch.ops.mmkd_native
    n, m = q.shape[0], k.shape[0]

    def backward(symmetric, n_vectors=n, m_vectors=m):
        v, w = torch.ones(n_vectors), torch.ones(m_vectors)
        return ops.contrastive_backward(v, w, q, k, t, v, w, v, w, 20.0, True, symmetric, True, True)

    return {
        "forward": lambda: ops.contrastive_forward(q, k, t, 20.0, True, False),
        "symmetric forward": lambda: ops.contrastive_forward(q, k, t, 20.0, True, True),
        "forward with grad": lambda: ops.contrastive_forward_with_grad(q, k, t, 20.0, True, True, True),
        "backward": lambda: backward(False),
        "symmetric backward": lambda: backward(True),
        "backward, short vectors": lambda: backward(False, n_vectors=3),
    }


@pytest.mark.parametrize("case", ["targets too short", "symmetric with M != N", "short vectors", "3-D q",
                                  "integer k", "other widths"])
def test_a_direct_contrastive_op_call_with_bad_shapes_is_refused(case):
    """The public loss checks its arguments; the ops called directly must too: the CPU ops read the
    targets and every per-row vector up to N (and, symmetric, the columns' up to M), so short ones
    segfaulted or corrupted the heap ("corrupted size vs. prev_size") instead of raising, as the
    CUDA ops always did."""
    q, k = torch.randn(300, 8), torch.randn(300, 8)
    t = torch.arange(300)
    if case == "targets too short":
        calls = _contrastive_calls(q, k, torch.arange(10))
        wanted = ["forward", "forward with grad", "backward"]
    elif case == "symmetric with M != N":
        calls = _contrastive_calls(q, torch.randn(3, 8), torch.zeros(300, dtype=torch.long))
        wanted = ["symmetric forward", "symmetric backward"]
    elif case == "short vectors":
        calls, wanted = _contrastive_calls(q, k, t), ["backward, short vectors"]
    else:
        q, k = {"3-D q": (q[None], k), "integer k": (q, k.long()), "other widths": (q, torch.randn(300, 7))}[case]
        calls, wanted = _contrastive_calls(q, k, t), ["forward", "forward with grad", "backward"]
    for name in wanted:
        with pytest.raises(RuntimeError, match="must have shape|symmetric needs|must be 2-D|floating point|same width"):
            calls[name]()


def test_unknown_kind_is_refused_by_the_kernel():
    s = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="kind must be 'mse', 'pearson' or 'kl', got 'cosine'"):
        torch.ops.mmkd_native.structure_tile_forward(s, s, "cosine", 1.0, True, 0, 5)


def _kl_rows(s, t, scale, rows, with_grad=False):
    """Native kl per-row losses of rows [start, stop) (or the loss sum and gradients, with_grad)."""
    start, stop = rows
    if with_grad:
        return torch.ops.mmkd_native.structure_tile_forward_with_grad(s, t, "kl", scale, True, start, stop - start,
                                                                      True, True)
    return torch.ops.mmkd_native.structure_tile_forward(s, t, "kl", scale, True, start, stop - start)


@pytest.mark.parametrize("n", [1024, 2300])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_kl_over_the_upper_triangle_matches_whole_rows(dtype, tol, n):
    """All n ≥ 1024 rows of kl take the upper triangle (each pair once for both rows, its sums merged
    across strips of max(256, n/8) rows); a range of rows takes whole rows. n = 1024 is the first
    size to take it (four strips), n = 2300 crosses nine. The two agree on every row's loss and on
    the gradients of their sum, with both inputs trained and with the teacher frozen."""
    gen = torch.Generator().manual_seed(11)
    s = torch.randn(n, 40, generator=gen, dtype=dtype)
    t = torch.randn(n, 24, generator=gen, dtype=dtype)
    split = 2 * n // 3
    whole_rows = torch.cat([_kl_rows(s, t, 10.0, (0, split)), _kl_rows(s, t, 10.0, (split, n))])
    upper = _kl_rows(s, t, 10.0, (0, n))
    assert (upper - whole_rows).abs().max().item() <= tol * whole_rows.abs().max().item()
    loss_a, ds_a, dt_a = _kl_rows(s, t, 10.0, (0, split), with_grad=True)
    loss_b, ds_b, dt_b = _kl_rows(s, t, 10.0, (split, n), with_grad=True)
    loss, ds, dt = _kl_rows(s, t, 10.0, (0, n), with_grad=True)
    assert abs(loss.item() - (loss_a + loss_b).item()) <= tol * abs(loss.item())
    for got, want in ((ds, ds_a + ds_b), (dt, dt_a + dt_b)):
        assert (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item() <= tol
    frozen_loss, frozen_ds, frozen_dt = torch.ops.mmkd_native.structure_tile_forward_with_grad(
        s, t, "kl", 10.0, True, 0, n, True, False)
    assert frozen_dt.numel() == 0
    assert abs(frozen_loss.item() - loss.item()) <= tol * abs(loss.item())
    assert (torch.linalg.vector_norm(frozen_ds - ds) / torch.linalg.vector_norm(ds)).item() <= tol


def test_kl_over_the_upper_triangle_of_a_student_close_to_its_teacher():
    """The merged sums keep float32's tolerance where each row's KL is tiny (as
    test_structure.py's test_kl_of_a_student_close_to_its_teacher, with rows in nine strips)."""
    n = 2300
    gen = torch.Generator().manual_seed(12)
    teacher = torch.randn(n, 96, generator=gen)
    for noise in (0.03, 0.003):
        s = (teacher + noise * torch.randn(n, 96, generator=gen)).requires_grad_()
        s64 = s.detach().double().requires_grad_()
        out = mk.structure_loss(s, teacher, kind="kl", temperature=0.1, backend="native")
        ref = mk.structure_loss(s64, teacher.double(), kind="kl", temperature=0.1, backend="reference")
        assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item()), f"loss at noise {noise}"
        if noise == 0.03:
            (grad,), (grad_ref,) = torch.autograd.grad(out, s), torch.autograd.grad(ref, s64)
            assert (torch.linalg.vector_norm(grad.double() - grad_ref) / torch.linalg.vector_norm(grad_ref)) <= 1e-5


@pytest.mark.parametrize("n", [300, 1100])
def test_kl_of_a_student_equal_to_its_teacher_is_exactly_zero(n):
    """Each pair's d = scale·(b − a) is taken from the similarities' difference, which is 0 where
    they are equal: the loss and both gradients are exactly 0, over whole rows (n < 1024) and over
    the upper triangle. As b·scale − a·scale (an FMA for one of them), float32 gave gradients up to
    2e-5 at temperature 0.05."""
    x = torch.randn(n, 48, generator=torch.Generator().manual_seed(13))
    loss, ds, dt = torch.ops.mmkd_native.structure_tile_forward_with_grad(x, x.clone(), "kl", 20.0, True, 0, n,
                                                                          True, True)
    assert loss.item() == 0
    assert ds.abs().max().item() == 0 and dt.abs().max().item() == 0
    assert torch.ops.mmkd_native.structure_tile_forward(x, x.clone(), "kl", 20.0, True, 0, n).abs().max().item() == 0


def test_the_cuda_architectures_follow_the_gpu_or_fall_back_to_h100_with_ptx(monkeypatch):
    """sm_90 code alone runs on no other major version: without PTX, a newer GPU had no kernel image."""
    monkeypatch.delenv("MMKD_CUDA_ARCH", raising=False)
    assert native_build.cuda_arch() == "9.0+PTX"
    assert native_build.cuda_arch((9, 0)) == "9.0" and native_build.cuda_arch((12, 0)) == "12.0"
    assert native_build.cuda_arch((7, 5)) == "9.0+PTX"  # older than the kernels' sm_80: no build for it
    monkeypatch.setenv("MMKD_CUDA_ARCH", "8.0;9.0")
    assert native_build.cuda_arch((8, 6)) == "8.0;9.0"
