"""Triton's column splits on a GPU, split against unsplit, side by side in one run.

A rank's few rows against every rank's gathered teacher rows leave the row-parallel kernels few
programs; ``mmkd_kernels.triton.tiles.column_split`` then splits the columns. Each case here is the
frozen-teacher contrastive loss, forward + backward in bfloat16, with the split the launchers choose
and with one split (``MMKD_TRITON_COLUMN_SPLITS=1``), each warmed up (autotuned) first:

    python -m benchmarks.gpu.splits --out DIR     # DIR/<device>-<date>-splits.{json,md}

``benchmarks/gpu/run.sh`` runs it after the goals.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from pathlib import Path

import torch

import mmkd_kernels as mk
from benchmarks import measure, report
from mmkd_kernels.triton import tiles

# (student rows, teacher rows, D): 512 and 2048 rows of one rank against 64K gathered rows, and a
# square 4096 that the policy leaves unsplit (the forced split's cost shows there).
CASES = [(512, 65536, 768), (2048, 65536, 768), (512, 65536, 384), (4096, 4096, 768)]
MODES = ("chosen", "one split")


@contextlib.contextmanager
def _splits(value: str | None):
    """MMKD_TRITON_COLUMN_SPLITS set to ``value`` (unset: None) inside the block."""
    old = os.environ.pop(tiles.COLUMN_SPLITS_VARIABLE, None)
    if value is not None:
        os.environ[tiles.COLUMN_SPLITS_VARIABLE] = value
    try:
        yield
    finally:
        os.environ.pop(tiles.COLUMN_SPLITS_VARIABLE, None)
        if old is not None:
            os.environ[tiles.COLUMN_SPLITS_VARIABLE] = old


def run_case(rows: int, cols: int, d: int, device: torch.device, min_time: float) -> list[dict]:
    """One row per mode: time (median ms, runs), peak extra memory, and the splits of the student's
    gradient pass (the split of its statistics' pass is chosen alike)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(rows, d, device=device, generator=gen, dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(cols, d, device=device, generator=gen, dtype=torch.bfloat16)
    out = []
    for mode in MODES:
        with _splits(None if mode == "chosen" else "1"):
            splits = tiles.column_split(cols, rows, device, d)[1]

            def step():
                q.grad = None
                mk.contrastive_loss(q, k, backend="triton").backward()

            step()  # autotunes this mode's kernels outside the timing
            timing = measure.time_cuda(step, device, min_time=min_time, min_repeats=5, max_repeats=15)
        out.append(dict(rows=rows, cols=cols, d=d, mode=mode, splits=splits, ms=timing.median_ms,
                        runs=timing.repeats, times_ms=timing.all_ms, peak_extra_mib=timing.peak_extra_mib,
                        flops=8 * rows * cols * d))
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Triton column splits: {meta['device_name']} ({meta['date'][:10]})", "",
             f"`{meta['command']}` · torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
             f"git {str(meta['git_commit'])[:12]}", "",
             "Frozen-teacher contrastive loss, forward + backward, bfloat16: the split the launchers choose "
             "against one split (`MMKD_TRITON_COLUMN_SPLITS=1`). FLOPs 8·rows·cols·D.", "",
             "| rows × cols × D | splits chosen | chosen | one split | speed-up |", "|---|---:|---:|---:|---:|"]
    by_case: dict[tuple, dict] = {}
    for row in result["rows"]:
        by_case.setdefault((row["rows"], row["cols"], row["d"]), {})[row["mode"]] = row
    for (rows, cols, d), modes in by_case.items():
        chosen, one = modes.get("chosen"), modes.get("one split")
        cell = lambda r: f"{r['ms']:.3g} ms · {r['flops'] / r['ms'] / 1e9:.0f} TFLOP/s" if r else "—"  # noqa: E731
        speedup = f"{one['ms'] / chosen['ms']:.2f}×" if chosen and one else "—"
        lines.append(f"| {rows} × {cols} × {d} | {chosen['splits'] if chosen else '—'} | {cell(chosen)} | "
                     f"{cell(one)} | {speedup} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report.slug(result['meta']['device_name'])}-{result['meta']['date'][:10]}-splits"
    report.write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(markdown(result))
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.splits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per mode")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu.splits needs a CUDA device; none here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    meta = report.environment(device)
    meta["command"] = "python -m benchmarks.gpu.splits " + " ".join(sys.argv[1:] if argv is None else argv)
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = dict(meta=meta, rows=[])
    for rows, cols, d in CASES:
        result["rows"] += run_case(rows, cols, d, device, args.min_time)
        path = write(result, args.out)  # after every case: a cut run keeps what it measured
    print(path.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
