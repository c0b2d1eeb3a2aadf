"""Every Triton kernel × autotune config compiled for an H100 (sm_90a), here, without a GPU.

    python -m benchmarks.triton_sm90                      # all configs; writes results/triton-sm90-<date>.*
    python -m benchmarks.triton_sm90 --first-config --dtypes bfloat16,float32 --out /tmp/s
                                                          # what tests/test_triton_sm90.py runs

Triton lowers a kernel to PTX on any machine, and its bundled ``ptxas -v`` reports what the H100
would run: registers per thread, bytes spilled to local memory, shared memory, and whether the
dots became Hopper tensor-core instructions (``wgmma``). That catches what the interpreter cannot
(a kernel that does not compile for the GPU, a config that spills or does not fit) and tells which
configs are worth timing, before a GPU is at hand. Inputs are taken as contiguous, 16-byte-aligned
rows of a width that is a multiple of 16 (D = 384 or 768), as Triton's launcher specializes them.
Writes ``<out>/triton-sm90-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The GPU configs are chosen when the kernels are defined: under the interpreter there is one.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks import result_files  # noqa: E402
from mmkd_kernels.triton import contrastive, structure  # noqa: E402

ARCH = 90
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (227 KiB)
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Which pointer arguments hold the inputs (their dtype), which hold integer targets; every other
# pointer is a float32 buffer of the launchers.
INPUT_POINTERS = {"A", "B", "S", "T"}
TARGET_POINTERS = {"TARGETS", "T_A", "T_B"}
FLOAT_SCALARS = {"scale", "shift"}
UNIT_STRIDES = {"stride_ad", "stride_bd", "s_col", "t_col"}  # contiguous rows: Triton specializes 1s
# Widths and row strides that are multiples of 16 (D = 384, 768), which Triton's launcher marks as
# such, letting the loads vectorize; the row counts stay arbitrary.
MULTIPLES_OF_16 = {"d", "ds", "dt", "stride_a", "stride_b", "s_row", "t_row"}


def _kernels():
    """(name, autotuner, the constexpr variants the launchers use). Each kernel's first variant
    comes again with int64 indices (INT64_OFFSETS, for tensors past 2^31 elements: tiles.py), the
    others keep int32 ones, as every usual size does."""
    kinds = [dict(KIND=code, CENTRED=False) for code in structure.KIND_CODES.values()]
    kinds.append(dict(KIND=structure.KIND_CODES["kl"], CENTRED=True))
    kernels = [
        ("contrastive._lse_kernel", contrastive._lse_kernel,
         [dict(COLUMNS=c, SPLIT=s) for s in (False, True) for c in (False, True)]),
        ("contrastive._lse_grad_kernel", contrastive._lse_grad_kernel,
         [dict(FIXED_SHIFT=f, SPLIT=s) for s in (False, True) for f in (False, True)]),
        ("contrastive._grad_kernel", contrastive._grad_kernel,
         [dict(HAS_A_TERM=a, HAS_B_TERM=b, SPLIT=s) for s in (False, True)
          for a, b in ((True, False), (False, True), (True, True))]),
        ("structure._rows_kernel", structure._rows_kernel, kinds),
        ("structure._grad_kernel", structure._grad_kernel, [dict(k, SIDE=s) for k in kinds for s in (0, 1)]),
    ]
    return [(name, kernel, [dict(v, INT64_OFFSETS=False) for v in variants] + [dict(variants[0], INT64_OFFSETS=True)])
            for name, kernel, variants in kernels]


def _configs(kernel, dtype: str) -> list:
    return kernel.configs_by_dtype["float32" if dtype == "float32" else "half"]


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    signature = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr or name in constexprs:
            signature[name] = "constexpr"
        elif name in INPUT_POINTERS:
            signature[name] = "*" + DTYPES[dtype]
        elif name in TARGET_POINTERS:
            signature[name] = "*i64"
        elif name.isupper() or name[0].isupper():
            signature[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_one(job: tuple) -> dict:
    """Compile one kernel × variant × dtype × config; what ptxas says of it."""
    name, index, variant, dtype, config_index = job
    kernel = dict((n, k) for n, k, _ in _kernels())[name]
    config = _configs(kernel, dtype)[config_index]
    fn = kernel.fn
    constexprs = dict(config.kwargs, **variant, PRECISION="ieee" if dtype == "float32" else "tf32")
    constexprs.update({p.name: 1 for p in fn.params if p.name in UNIT_STRIDES})
    signature = _signature(fn, dtype, constexprs)
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
               if signature[p.name].startswith("*") or p.name in MULTIPLES_OF_16}
    row = dict(kernel=name, variant=variant, dtype=dtype, config=dict(config.kwargs), num_warps=config.num_warps,
               num_stages=config.num_stages, config_index=config_index)
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
        compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    except Exception as error:  # noqa: BLE001  (the report records why a config does not compile)
        return dict(row, status=f"does not compile: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        info = subprocess.run([get_ptxas(ARCH).path, "-v", f"--gpu-name=sm_{ARCH}a", str(path), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    text = info.stdout + info.stderr
    spill_stores, spill_loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    shared = int(compiled.metadata.shared)
    return dict(row, status="ok", registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
                shared_bytes=shared, fits=shared <= SHARED_MEMORY_LIMIT, wgmma="wgmma" in ptx)


def jobs(dtypes: list[str], first_config: bool) -> list[tuple]:
    out = []
    for name, kernel, variants in _kernels():
        for index, variant in enumerate(variants):
            for dtype in dtypes:
                count = 1 if first_config else len(_configs(kernel, dtype))
                out += [(name, index, variant, dtype, c) for c in range(count)]
    return out


def _variant(variant: dict) -> str:
    return ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in variant.items()) or "—"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Triton kernels compiled for sm_{ARCH}a ({meta['date'][:10]})",
        "",
        f"`python -m benchmarks.triton_sm90` · triton {meta['triton']} · {meta['ptxas']} · no GPU was used: "
        "these are the compiler's numbers, not timings.",
        "",
        "Registers per thread (255 at most), bytes spilled to local memory (stores/loads), shared memory "
        f"per block (an H100 block may use {SHARED_MEMORY_LIMIT // 1024} KiB), and whether the dots became "
        "Hopper tensor-core `wgmma` instructions (float32 uses exact FMA dots, so never).",
        "",
        "| kernel | variant | dtype | config | warps · stages | registers | spills | shared KiB | wgmma |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        config = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in r["config"].items())
        head = (f"| {r['kernel']} | {_variant(r['variant'])} | {r['dtype']} | {config} | "
                f"{r['num_warps']} · {r['num_stages']} |")
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | |")
            continue
        spills = "0" if not (r["spill_stores"] or r["spill_loads"]) else f"{r['spill_stores']}/{r['spill_loads']}"
        fits = "" if r["fits"] else " (too much)"
        lines.append(f"{head} {r['registers']} | {spills} | {r['shared_bytes'] / 1024:.0f}{fits} | "
                     f"{'yes' if r['wgmma'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: float32,float16,bfloat16")
    parser.add_argument("--first-config", action="store_true", help="only each kernel's first config")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    todo = jobs(dtypes, args.first_config)
    rows = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for done, row in enumerate(pool.map(compile_one, todo), 1):
            rows.append(row)
            print(f"\r[{done}/{len(todo)}] {row['kernel']} {row['dtype']}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ptxas = subprocess.run([get_ptxas(ARCH).path, "--version"], capture_output=True, text=True).stdout.strip()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                triton=triton.__version__, ptxas=ptxas.splitlines()[-1] if ptxas else "ptxas", arch=f"sm_{ARCH}a")
    result = dict(meta=meta, rows=rows)
    stem = args.out / result_files.free_stem(args.out, f"triton-sm{ARCH}-{meta['date'][:10]}", ("json", "md"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    failed = [r for r in rows if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
