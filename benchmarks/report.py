"""What a run leaves behind: ``<device>-<date>.json`` (everything), ``.md`` (the tables), ``.png`` (the plot).

The JSON is the record: the machine, the versions, the git commit, the command line, the ceilings
measured in the run, every row (one loss × backend × D × N, measured or the reason why not) and
the accuracy checks. The Markdown and the PNG are drawn from it alone.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import autotune_log
from mmkd_kernels import gram

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# The machine and the software
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name and its widest vector ISA, e.g. "AMD EPYC (AVX2)": machines that share a
    model name here differ in it (AVX-512 or not), and the native kernels' speed with it."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{name} ({isa})" if isa else name


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def file_stem(device: torch.device, date: datetime.date) -> str:
    """"cpu-amd-epyc-2026-05-09", "nvidia-h100-80gb-hbm3-2026-05-09"."""
    name = slug(device_name(device))
    prefix = "" if device.type == "cuda" else "cpu-"
    return f"{prefix}{name}-{date.isoformat()}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str | None:
    """The checkout's commit; on a GPU machine, which gets the working tree without .git, the one
    benchmarks/gpu/run.sh passes as MMKD_GIT_COMMIT."""
    return _git("rev-parse", "HEAD") or os.environ.get("MMKD_GIT_COMMIT")


def environment(device: torch.device) -> dict:
    # Results written by earlier runs are not code: a run beside them is still of a clean commit.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "sentence_transformers": _version("sentence-transformers"),
        "inf_cl": _version("inf-cl") or _version("inf_cl"),
        "memeff": _version("memeff"),
        "platform": platform.platform(),
        # Timings on a shared machine are only as good as its quiet: say how busy it was.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "git_dirty": bool(status) if status is not None else None,
    }


# --------------------------------------------------------------------------------------------------
# Derived columns
# --------------------------------------------------------------------------------------------------


def add_speedups(rows: list[dict]) -> None:
    """speedup_fwd_bwd / speedup_fwd: reference eager time over the row's, same loss, D and N."""
    ref = {(r["loss"], r["d"], r["n"]): r for r in rows if r["backend"] == "reference" and r["status"] == "ok"}
    for row in rows:
        base = ref.get((row["loss"], row["d"], row["n"]))
        for mode in ("fwd_bwd", "fwd"):
            ok = base is not None and row["status"] == "ok" and row.get(f"{mode}_ms")
            row[f"speedup_{mode}"] = base[f"{mode}_ms"] / row[f"{mode}_ms"] if ok else None


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _clean(value):
    """JSON has no NaN/Inf: write them as strings that say so."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(result), indent=1) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def fmt_ms(value: float) -> str:
    return f"{value:.3g} ms" if value < 999.5 else f"{value / 1e3:.3g} s"


def fmt_mib(value: float | None) -> str:
    if value is None or isinstance(value, str):
        return "?"
    return f"{value:.0f} MiB" if value >= 10 else f"{value:.2g} MiB"


def _cell(row: dict | None, mode: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return _short_status(row["status"])
    parts = [fmt_ms(row[f"{mode}_ms"])]
    if row.get(f"speedup_{mode}") is not None:
        parts.append(f"{row[f'speedup_{mode}']:.2f}×")
    if row.get(f"pct_ceiling_{mode}") is not None:
        parts.append(f"{row[f'pct_ceiling_{mode}']:.0f}%")
    parts.append(fmt_mib(row.get(f"{mode}_peak_extra_mib")))
    return " · ".join(parts)


def _short_status(status: str) -> str:
    """A table cell's account of a size not measured; the JSON keeps the whole reason."""
    for prefix, short in (("skipped: over time budget", "— (over time budget)"),
                          ("skipped: predicted out of memory", "— (would not fit in memory)"),
                          ("skipped: failed at", "— (failed at a smaller N)")):
        if status.startswith(prefix):
            return short
    return status.replace("|", "/")[:80]


def _order(values, preferred) -> list:
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def markdown(result: dict, backend_order=()) -> str:
    meta, ceil = result["meta"], result["ceilings"]
    settings = meta["settings"]
    lines = [
        f"# mmkd-kernels benchmark: {meta['device_name']} ({meta['date'][:10]})",
        "",
        f"`{meta['command']}`" + (" (interrupted: partial results)" if meta.get("interrupted") else ""),
        "",
        f"- torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}, "
        f"sentence-transformers {meta['sentence_transformers']}; git {str(meta['git_commit'])[:12]}"
        f"{' (uncommitted changes)' if meta['git_dirty'] else ''}",
        f"- device: {_device_line(meta)}",
        f"- inputs: student (N, D) requires grad, teacher (N, D) frozen, {settings['dtype']}; time = median of "
        f"warm runs over {settings['rotating_sets']} rotating input sets ({meta['timing_method']})",
        f"- peak extra memory: {meta['memory_method']}",
        "- ceilings measured in this run: " + ", ".join(ceiling_summary(ceil)),
        "",
        "Cells: time (median) · speed-up over reference eager · % of the matmul ceiling (FLOP counts of "
        "DESIGN §5) · peak extra memory; forward + backward computes the student's gradient, forward "
        "only is the loss under no_grad. `-gram` columns run the gram algorithm of the structure loss "
        f"(float64 blocks of {settings.get('gram_block_elements', gram.BLOCK_ELEMENTS)} elements), "
        "the others the tile algorithm (materialized N×N for reference and compile). A backend that "
        "computes the gradient inside the forward (chunked and native, for both losses) skips the "
        "backward's recompute of the similarities (4·N·M·D instead of the counted 6·N·M·D for the "
        "contrastive loss, and likewise for the structure loss's tile algorithm) and can show more than "
        "100%.",
        "",
    ]
    rows, errors = result["rows"], result["errors"]
    for loss in _order((r["loss"] for r in rows), settings["losses"]):
        for d in sorted({r["d"] for r in rows if r["loss"] == loss}):
            subset = [r for r in rows if r["loss"] == loss and r["d"] == d]
            names = _order((r["backend"] for r in subset), backend_order)
            sizes = sorted({r["n"] for r in subset})
            by_key = {(r["backend"], r["n"]): r for r in subset}
            for mode, title in (("fwd_bwd", "forward + backward"), ("fwd", "forward only (no_grad)")):
                lines += [f"## {loss}, D = {d}: {title}", "",
                          "| N | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
                for n in sizes:
                    lines.append(f"| {n} | " + " | ".join(_cell(by_key.get((b, n)), mode) for b in names) + " |")
                lines.append("")
            errs = [e for e in errors if e["loss"] == loss and e["d"] == d]
            if errs:
                lines += [f"Accuracy, {loss}, D = {d}: relative error ‖out − ref‖/‖ref‖ against the float64 "
                          "reference on the same rounded inputs", "",
                          "| backend | N | loss | student gradient |", "|---|---:|---:|---:|"]
                for e in sorted(errs, key=lambda e: names.index(e["backend"]) if e["backend"] in names else 99):
                    if e["status"] == "ok":
                        lines.append(f"| {e['backend']} | {e['n']} | {_err(e['rel_err_loss'])} | {_err(e['rel_err_grad'])} |")
                    else:
                        lines.append(f"| {e['backend']} | {e['n']} | {e['status']} | |")
                lines.append("")
    lines += autotune_log.markdown(result.get("autotune", []))
    return "\n".join(lines)


def _device_line(meta: dict) -> str:
    host = f"{meta['cpu_count']} cores, torch threads {meta['torch_threads']}"
    if meta.get("load_average_1min") is not None:
        host += f", load average {meta['load_average_1min']} at the end of the run"
    if meta["device"] == "cuda":
        return f"{meta['device_name']} (CUDA {meta['cuda']}); host CPU {meta['cpu_model']}, {host}"
    return f"CPU {meta['cpu_model']}, {host}"


def _err(value) -> str:
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def ceiling_summary(ceil: dict) -> list[str]:
    side = ceil["matmul_square_side"]
    out = [f"fp32 mm {side}³ {_si(ceil['matmul_fp32_flops'], 'FLOP/s')}"]
    if "matmul_bf16_flops" in ceil:
        out.append(f"bf16 mm {side}³ {_si(ceil['matmul_bf16_flops'], 'FLOP/s')}")
    blocks = ceil.get("matmul_block_fp32_flops", {})
    if blocks:
        best = max(blocks.items(), key=lambda item: item[1]["flops"])
        worst = min(blocks.items(), key=lambda item: item[1]["flops"])
        out.append(f"row-block fp32 mm (block×D)·(D×N) {_si(worst[1]['flops'], 'FLOP/s')} "
                   f"(N×D {worst[0]}) to {_si(best[1]['flops'], 'FLOP/s')} (N×D {best[0]})")
    out.append(f"copy {_si(ceil['copy_bytes_per_s'], 'B/s')}")
    return out


# --------------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------------


def plot(result: dict, path: Path, backend_order=()) -> None:
    """Time vs N and peak extra memory vs N, log-log, one line per backend, one row per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    losses = _order((r["loss"] for r in result["rows"]), result["meta"]["settings"]["losses"])
    names = _order((r["backend"] for r in result["rows"]), backend_order)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    # Distinct markers too: backends with the same memory (reference and compile) overlap exactly.
    markers = {name: "osD^vPX*<>"[i % 10] for i, name in enumerate(names)}
    dims = sorted({r["d"] for r in result["rows"]})
    styles = dict(zip(dims, itertools.cycle(("-", "--", ":", "-."))))  # a fifth width reuses a style
    fig, axes = plt.subplots(len(losses), 2, figsize=(12, 3.6 * len(losses)), squeeze=False)
    for row_axes, loss in zip(axes, losses):
        for name in names:
            for d, style in styles.items():
                points = sorted((r["n"], r["fwd_bwd_ms"], r["fwd_bwd_peak_extra_mib"]) for r in rows
                                if r["loss"] == loss and r["backend"] == name and r["d"] == d)
                if not points:
                    continue
                label = name if len(dims) == 1 else f"{name}, D={d}"
                n, ms, mib = zip(*points)
                kwargs = dict(marker=markers[name], markerfacecolor="none", color=colors[name], label=label)
                row_axes[0].plot(n, ms, style, **kwargs)
                # RSS is counted in whole pages: a near-zero peak cannot sit on a log axis.
                row_axes[1].plot(n, [max(m, 0.1) for m in mib], style, **kwargs)
        for ax, what in zip(row_axes, ("forward + backward time (ms)", "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (rows of student and teacher)")
            ax.set_ylabel(what)
            ax.set_title(f"{loss}: {what.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"mmkd-kernels, {meta['device_name']}, D = {', '.join(map(str, dims))}, "
                 f"{meta['settings']['dtype']}, {meta['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict, out_dir: Path, stem: str, backend_order=()) -> dict[str, Path]:
    """The three files (no PNG where no size was measured: an empty figure says nothing); returns
    their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    write_json(paths["json"], result)
    paths["md"].write_text(markdown(result, backend_order) + "\n")
    if any(row["status"] == "ok" for row in result["rows"]):
        plot(result, paths["png"], backend_order)
    else:
        del paths["png"]
    return paths
