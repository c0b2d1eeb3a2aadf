"""The native CPU kernels under AddressSanitizer: no read or write outside a buffer, anywhere.

A kernel that reads a few elements past a row block, or writes past an output, usually lands in
memory the allocator owns anyway: the numbers may even stay right, and the other tests pass. Here
the extension is built again with ``MMKD_SANITIZE=address`` (mmkd_kernels/native_build.py) and run
in a process of its own with libasan preloaded, through the public API and the ops themselves, on
shapes that end row blocks, tiles and vector loops part-way; AddressSanitizer stops that process
at the first bad access and says where. The numbers are checked against the float64 reference
too, and the process checks that the sanitized build is the one it loaded.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _libasan() -> str | None:
    """The AddressSanitizer runtime of the compiler that builds the extension ($CXX, as torch's
    build takes it, else c++), or None where it has none."""
    try:
        path = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libasan.so"], capture_output=True,
                              text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


LIBASAN = _libasan() if sys.platform.startswith("linux") else None
# Marks the tests that run the sanitized build: a condition known at collection, said in the report.
needs_libasan = pytest.mark.skipif(LIBASAN is None,
                                   reason="needs Linux and a C++ compiler with AddressSanitizer (libasan)")


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """(the sanitized extension's path, the environment that runs it)."""
    out = tmp_path_factory.mktemp("sanitized")
    env = dict(os.environ, MMKD_SANITIZE="address", MMKD_BUILD_CUDA="0")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out / "lib"),
                            "--build-temp", str(out / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=1200)
    assert build.returncode == 0, build.stderr[-4000:]
    (library,) = (out / "lib" / "mmkd_kernels").glob("_C*.so")
    # detect_leaks: CPython and torch keep memory until exit by design; that is not ours to report.
    run_env = {k: v for k, v in os.environ.items() if k != "MMKD_SANITIZE"}
    run_env.update(LD_PRELOAD=LIBASAN, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    return library, run_env


# Run in the sanitized process: the sanitized library stands in for mmkd_kernels._C, so that
# `import mmkd_kernels` registers its autograd and fake functions on these ops.
_CASES = """
import itertools, sys, types, torch
from pathlib import Path
torch.ops.load_library(sys.argv[1])
sys.modules["mmkd_kernels._C"] = types.ModuleType("mmkd_kernels._C")
import mmkd_kernels as mk
from mmkd_test_support import TOLERANCE, randn, rel_err
from mmkd_kernels import chunked

checked = 0
def check(got, want, dtype, what):
    global checked
    assert rel_err(got, want) <= TOLERANCE[dtype], (what, dtype, rel_err(got, want))
    checked += 1

# (N, M, D): single rows, M > N, a row block of 1024 and a part (row_block in csrc/cpu/common.h),
# widths that end vector loops and blocks of 8 part-way.
SHAPES = [(1, 1, 1), (2, 3, 7), (17, 29, 13), (1100, 1301, 33)]
# Contiguous inputs, whose allocations end where the tensors do, then views with room around them.
LAYOUTS = [("contiguous", "contiguous"), ("strided", "transposed")]
for dtype, (n, m, d), (q_layout, k_layout) in itertools.product(
        (torch.float32, torch.float64, torch.float16, torch.bfloat16), SHAPES, LAYOUTS):
    q = randn(n, d, seed=n + d, dtype=dtype, layout=q_layout).requires_grad_(True)
    k = randn(m, d, seed=m + d, dtype=dtype, layout=k_layout).requires_grad_(True)
    q64, k64 = (x.detach().double().requires_grad_(True) for x in (q, k))
    targets = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(n))
    for symmetric in ([False, True] if n == m else [False]):
        options = dict(temperature=0.05, symmetric=symmetric, targets=None if symmetric else targets)
        got = mk.contrastive_loss(q, k, backend="native", **options)
        want = mk.contrastive_loss(q64, k64, backend="reference", **options)
        check(got, want, dtype, ("contrastive", n, m, d, symmetric))
        grads, grads64 = torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q64, k64))
        for g, g64 in zip(grads, grads64):
            check(g, g64, dtype, ("contrastive gradient", n, m, d, symmetric))
        with torch.no_grad():
            check(mk.contrastive_loss(q, k, backend="native", **options), want, dtype, ("no_grad", n, m, d))
    if n < 4:
        continue
    s, t = q.detach()[:, : max(1, d - 3)], k.detach()[:n]
    if q_layout == "contiguous":
        s, t = s.contiguous(), t.contiguous()
    for kind in ("mse", "pearson", "kl"):
        for start, count in ((0, n), (1, n - 3)):
            got = torch.ops.mmkd_native.structure_tile_forward_with_grad(s.detach(), t.detach(), kind, 2.0, True,
                                                                         start, count, True, True)
            want = chunked.structure_tile_forward_with_grad(s.detach().double(), t.detach().double(), kind, 2.0,
                                                            True, start, count, True, True)
            for out, ref in zip(got, want):
                check(out, ref, dtype, ("structure", kind, n, start, count))
            rows = torch.ops.mmkd_native.structure_tile_forward(s.detach(), t.detach(), kind, 2.0, True, start,
                                                                count)
            check(rows, chunked.structure_tile_forward(s.detach().double(), t.detach().double(), kind, 2.0,
                                                       True, start, count), dtype, ("structure rows", kind, n))
# The sanitized library is the one that ran, not the installed mmkd_kernels._C.
maps = Path("/proc/self/maps").read_text()
assert sys.argv[1] in maps and "mmkd_kernels/_C" not in maps.replace(sys.argv[1], ""), "another _C was loaded"
print("checked", checked)
"""


@needs_libasan
def test_cpu_kernels_stay_within_their_buffers(sanitized):
    library, env = sanitized
    run = subprocess.run([sys.executable, "-c", _CASES, str(library)], env=env, capture_output=True, text=True,
                         timeout=1200, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in run.stderr
    # 4 dtypes x 2 layouts x (4 shapes' contrastive checks (20) + 2 shapes x 3 kinds x 2 row ranges x 4
    # structure checks)
    assert int(run.stdout.split()[-1]) == 4 * 2 * (20 + 48), run.stdout


def test_the_switch_is_address_or_unset(monkeypatch):
    from mmkd_kernels import native_build

    monkeypatch.delenv("MMKD_SANITIZE", raising=False)
    assert native_build.sanitizer_flags() == [] and "-fsanitize=address" not in native_build.cxx_flags(False)
    monkeypatch.setenv("MMKD_SANITIZE", "address")
    assert "-fsanitize=address" in native_build.cxx_flags(False) and "-fsanitize=address" in native_build.link_flags()
    monkeypatch.setenv("MMKD_SANITIZE", "thread")
    with pytest.raises(ValueError, match="MMKD_SANITIZE must be address or unset, got 'thread'"):
        native_build.cxx_flags(False)


@needs_libasan
def test_the_sanitizer_is_live_in_that_process(sanitized):
    """The same environment reports a read past a malloc'd buffer (through memcpy, which the
    runtime intercepts) and fails the process: a clean run above means something."""
    _, env = sanitized
    probe = ("import ctypes; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
             "p = libc.malloc(16); ctypes.string_at(p, 32)")
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 99 and "heap-buffer-overflow" in run.stderr, (run.returncode, run.stderr[-3000:])
