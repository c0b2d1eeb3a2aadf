"""Every CUDA kernel of csrc/cuda compiled for an H100 (sm_90), here, without a GPU.

    python -m benchmarks.cuda_sm90             # writes results/cuda-sm90-<date>.{json,md}

``nvcc -Xptxas -v`` reports, for each template instance of each kernel, what the H100 would run:
registers per thread, bytes spilled to local memory, and the stack frame. From the registers
follows how many of the kernels' 256-thread blocks an SM holds at once (its 65 536 registers,
allocated per thread in steps of 8). The dynamic shared memory of each kernel is stated in its
file's header (every layout is checked at compile time to stay within 96 KiB). The companion of
benchmarks/triton_sm90.py; tests/test_cuda_sources.py compiles through ``compile_report``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import result_files

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
# The switches torch.utils.cpp_extension gives nvcc (the kernels must not need half operators).
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]
THREADS_PER_BLOCK = 256  # tiles.cuh kThreads
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_\d+'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def blocks_per_sm(registers: int) -> int:
    """256-thread blocks an SM holds at once, as its registers allow."""
    per_thread = -(-registers // 8) * 8
    return min(REGISTERS_PER_SM // (per_thread * THREADS_PER_BLOCK), MAX_THREADS_PER_SM // THREADS_PER_BLOCK)


def _demangle(names: list[str]) -> list[str]:
    """Readable kernel names: "grad_kernel<__nv_bfloat16, 6>" (c++filt where it exists)."""
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    # "void (anonymous namespace)::grad_kernel<float, 6>(float const*, ...)" -> "grad_kernel<float, 6>"
    return [re.sub(r"^void ", "", line.replace("(anonymous namespace)::", "")).split("(")[0]
            for line in out.splitlines()]


def compile_report(source: Path, arch: str = "sm_90") -> tuple[subprocess.CompletedProcess, list[dict]]:
    """nvcc -arch=<arch> -c <source> with -Xptxas -v: the process (its return code and output) and
    one row per kernel instance {file, kernel, registers, spill_stores, spill_loads, stack_bytes,
    blocks_per_sm}."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on the PATH")
    with tempfile.TemporaryDirectory() as tmp:
        command = [nvcc, f"-arch={arch}", "-std=c++17", *TORCH_NVCC_FLAGS, "-Xptxas", "-v", "-c", str(source),
                   "-o", str(Path(tmp) / "out.o")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    rows, current = [], None
    for line in (result.stdout + result.stderr).splitlines():
        if (match := _ENTRY.search(line)) is not None:
            current = {"file": source.name, "mangled": match.group(1)}
        elif current is not None and (match := _FRAME.search(line)) is not None:
            current.update(stack_bytes=int(match.group(1)), spill_stores=int(match.group(2)),
                           spill_loads=int(match.group(3)))
        elif current is not None and (match := _USED.search(line)) is not None:
            current["registers"] = int(match.group(1))
            current["blocks_per_sm"] = blocks_per_sm(current["registers"])
            rows.append(current)
            current = None
    for row, name in zip(rows, _demangle([row.pop("mangled") for row in rows])):
        row["kernel"] = name
    return result, rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# CUDA kernels compiled for {meta['arch']} ({meta['date']})", "",
             f"`python -m benchmarks.cuda_sm90` · {meta['nvcc']} · no GPU was used: these are the "
             "compiler's numbers, not timings.", "",
             "Registers per thread (255 at most), bytes spilled to local memory (stores / loads), and the "
             f"{THREADS_PER_BLOCK}-thread blocks an SM holds at once by its registers. Dynamic shared memory "
             "is in each .cu file's header.", "",
             "| file | kernel | registers | spills | blocks per SM |", "|---|---|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["file"], r["kernel"])):
        spills = f"{row['spill_stores']} / {row['spill_loads']}" if row["spill_stores"] or row["spill_loads"] else "0"
        lines.append(f"| {row['file']} | `{row['kernel']}` | {row['registers']} | {spills} | {row['blocks_per_sm']} |")
    spilling = [row for row in rows if row["spill_stores"]]
    lines += ["", f"{len(rows)} kernel instances; {len(spilling)} spill."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_sm90", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args(argv)
    sources = sorted(CUDA_DIR.glob("*.cu"))
    rows = []
    with concurrent.futures.ThreadPoolExecutor() as pool:
        for source, (result, found) in zip(sources, pool.map(lambda s: compile_report(s, args.arch), sources)):
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                raise SystemExit(f"{source.name} does not compile for {args.arch}")
            rows += found
            print(f"{source.name}: {len(found)} kernel instances", file=sys.stderr)
    version = subprocess.run([shutil.which("nvcc"), "--version"], capture_output=True, text=True).stdout
    date = datetime.date.today().isoformat()
    meta = {"arch": args.arch, "date": date, "nvcc": version.strip().splitlines()[-1]}
    stem = args.out / result_files.free_stem(args.out, f"cuda-{args.arch.replace('_', '')}-{date}", ("json", "md"))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "kernels": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
