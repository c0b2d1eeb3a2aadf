"""What builds the native extension, shared by setup.py and the just-in-time build (native.py):
its sources and compiler flags. Plain Python, no torch import."""

import hashlib
import os
import re
from pathlib import Path

# csrc/ beside the package: present in a source checkout and an editable install.
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def sources(with_cuda: bool, relative: bool = False) -> list[str]:
    """The extension's sources: absolute paths, or relative to the repository root (setup.py
    refuses absolute ones)."""
    files = ["bindings.cpp", "cpu/contrastive.cpp", "cpu/structure.cpp"]
    if with_cuda:
        files += ["cuda/ops_cuda.cpp", "cuda/contrastive.cu", "cuda/structure.cu"]
    return [f"csrc/{f}" if relative else str(CSRC / f) for f in files]


def source_digest(with_cuda: bool, root: Path | None = None) -> str:
    """"cpu_<hex>" or "cuda_<hex>": the SHA-256 of every file of csrc/ (``root``) that the build of
    that kind compiles or includes, names and bytes, in order: for the CPU build everything but
    cuda/, for the CUDA build everything but cuda/emulation/ (the CPU emulation of the CUDA kernels,
    compiled by tests only). The build writes it into the extension (MMKD_SOURCE_DIGEST) and
    native.py compares, so that an extension built from older sources is never loaded as if it were
    current, and an edit a build never reads (a .cu file, for a CPU build) does not count."""
    root = CSRC if root is None else root
    skipped = "cuda/emulation/" if with_cuda else "cuda/"
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")):
        relative = path.relative_to(root).as_posix()
        if not relative.startswith(skipped):
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{'cuda' if with_cuda else 'cpu'}_{digest.hexdigest()}"


# How the built extension holds its digest: these bytes, then the digest and a NUL (csrc/bindings.cpp).
DIGEST_MARKER = b"MMKD_SOURCE_DIGEST:"


def built_digest(library: Path) -> str | None:
    """The source digest written into the built extension at ``library``, or None (built before
    extensions held one). Read from the file's bytes, without loading it: a loaded extension has
    registered its ops for the whole process."""
    data = library.read_bytes()
    found = re.search(re.escape(DIGEST_MARKER) + rb"((?:cpu|cuda)_[0-9a-f]{64})\0", data)
    return found.group(1).decode("ascii") if found else None


def digest_is_current(built: str | None) -> bool:
    """Whether a built extension's digest is that of csrc/ now, for the build of its kind."""
    return built is not None and built == source_digest(with_cuda=built.startswith("cuda_"))


def cxx_flags(with_cuda: bool) -> list[str]:
    # -fopenmp: at::parallel_for is a header template whose threads exist only where _OPENMP is
    # defined; without it every epilogue ran on one core (csrc/cpu/common.h refuses such a build).
    # It also makes the `#pragma omp simd` loops vectorize.
    # -fno-trapping-math: their selects (fast_exp's clamps, the series' |x| < 1/2) become vector
    # blends. Under GCC's default a compare or multiply in one arm of a select "may trap", so
    # without AVX-512's masked operations every loop holding an exponential stayed scalar. Values
    # are unchanged: it only gives up floating-point exception flags, which nothing here reads.
    return ["-O3", "-fopenmp", "-fno-trapping-math", f"-march={os.environ.get('MMKD_CPU_ARCH', 'native')}",
            "-DMMKD_NATIVE", f"-DMMKD_SOURCE_DIGEST={source_digest(with_cuda)}", *sanitizer_flags()]


def link_flags() -> list[str]:
    # libgomp, by its soname libgomp.so.1: torch's wheel loads its own copy under that name first,
    # so the extension's threads and torch's share one OpenMP runtime and one thread count.
    return ["-fopenmp", *sanitizer_flags()]


def sanitizer_flags() -> list[str]:
    """MMKD_SANITIZE=address: the CPU kernels built with AddressSanitizer (for tests: a process
    loads them with libasan preloaded: tests/test_native_sanitized.py); unset, none."""
    switch = os.environ.get("MMKD_SANITIZE", "")
    if switch not in ("", "address"):
        raise ValueError(f"MMKD_SANITIZE must be address or unset, got {switch!r}")
    return ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer", "-g"] if switch else []


def cuda_arch(capability: tuple[int, int] | None = None) -> str:
    """The TORCH_CUDA_ARCH_LIST the CUDA kernels are built for: MMKD_CUDA_ARCH; else the present GPU's
    ``capability`` (major, minor) where it is sm_80 or newer (the kernels' bfloat16 tensor cores);
    else 9.0+PTX: H100 code, and PTX that a newer GPU's driver compiles for itself (sm_90 code alone
    runs on no other major version). It replaces a TORCH_CUDA_ARCH_LIST already in the environment (a
    GPU image may set one for many architectures, which would multiply the build's time)."""
    if "MMKD_CUDA_ARCH" in os.environ:
        return os.environ["MMKD_CUDA_ARCH"]
    if capability is not None and capability[0] >= 8:
        return f"{capability[0]}.{capability[1]}"
    return "9.0+PTX"


def nvcc_flags() -> list[str]:
    return ["-O3", "-std=c++17"]


def cuda_toolkit_missing(cuda_home: str | None) -> str | None:
    """Why the CUDA kernels cannot be compiled with the toolkit torch found (its CUDA_HOME), or
    None. nvcc alone is not enough: a machine may have nvcc on the PATH and the runtime headers
    elsewhere, and the build would then stop at ``#include <cuda_runtime.h>``. The headers are
    looked for where torch's build puts its include paths: CUDA_HOME/include and CUDA_INC_PATH."""
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on the PATH)"
    include_dirs = [Path(cuda_home) / "include"] + [Path(p) for p in [os.environ.get("CUDA_INC_PATH")] if p]
    if not any((folder / "cuda_runtime.h").is_file() for folder in include_dirs):
        return (f"the CUDA toolkit at CUDA_HOME={cuda_home} has no include/cuda_runtime.h (set CUDA_HOME to the "
                "toolkit's root, or CUDA_INC_PATH to the folder of its headers)")
    return None


def cuda_choice(torch_version: str, torch_cuda: str | None, cuda_home: str | None, gpu_present: bool = True,
                switch: str | None = None) -> tuple[bool, str | None]:
    """Whether to build the CUDA kernels, by MMKD_BUILD_CUDA (``switch``, else the environment):
    (with_cuda, a note saying why not when ``auto`` builds the CPU kernels only). ValueError for an
    unknown value, or for 1 where they cannot be built, naming the cause. ``gpu_present``: the
    just-in-time build skips them under ``auto`` where no GPU could run them."""
    switch = os.environ.get("MMKD_BUILD_CUDA", "auto") if switch is None else switch
    if switch not in ("0", "1", "auto"):
        raise ValueError(f"MMKD_BUILD_CUDA must be 0, 1 or auto, got {switch!r}")
    if switch == "0":
        return False, None
    if torch_cuda is None:
        why = f"torch {torch_version} is a CPU-only build (torch.version.cuda is None)"
    else:
        why = cuda_toolkit_missing(cuda_home)
    if why is None and switch == "auto" and not gpu_present:
        why = "no GPU is present to run them"
    if why is None:
        return True, None
    if switch == "1":
        raise ValueError(f"MMKD_BUILD_CUDA=1: {why}")
    return False, f"building the CPU kernels only: {why}"
