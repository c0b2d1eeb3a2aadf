"""What Triton's autotuner measured for our kernels during a benchmark: every config's time, per
kernel and tuning key, so that a GPU run's results say which configs win and which never do (the
configs of ``mmkd_kernels/triton`` were chosen for register fit; these tables are what tunes them).

Triton keeps only the last tuning's timings on each autotuner (``configs_timings``, with the key
it was tuned for last in ``cache``). A benchmark worker therefore asks ``Recorder.take`` after
each measured size: a size runs each kernel at one key, so nothing is lost between two asks.
Keys read from a disk cache (``cache_results``) were not timed in this process and are not
reported.
"""

from __future__ import annotations

import importlib

# The modules whose module-level kernels are autotuned.
KERNEL_MODULES = ("mmkd_kernels.triton.contrastive", "mmkd_kernels.triton.structure")


def autotuners() -> dict[str, object]:
    """name ("contrastive._lse_kernel") -> Triton Autotuner, for every autotuned kernel."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for attr, value in vars(module).items():
            if isinstance(value, Autotuner):
                found[f"{module_name.rsplit('.', 1)[-1]}.{attr}"] = value
    return found


def describe(config) -> str:
    """A config as its block sizes, warps and stages: "BLOCK_A=64 BLOCK_B=64 ... warps=8 stages=3"."""
    sizes = " ".join(f"{name}={value}" for name, value in config.kwargs.items())
    return f"{sizes} warps={config.num_warps} stages={config.num_stages}"


def _median_ms(timing) -> float | None:
    """Triton's timing of one config: quantiles (median first), one float, or inf (did not run)."""
    value = timing[0] if isinstance(timing, (list, tuple)) else timing
    value = float(value)
    return value if value != float("inf") else None


class Recorder:
    """Collects each autotuner's newest timings once."""

    def __init__(self):
        self._taken: dict[str, int] = {}  # kernel name -> id of the timings already reported

    def take(self) -> list[dict]:
        """The tunings done since the last call: one record per kernel tuned,
        {kernel, key, best, configs: [{config, ms}] fastest first (ms None: could not run)}."""
        records = []
        for name, tuner in autotuners().items():
            timings = getattr(tuner, "configs_timings", None)
            if not timings or self._taken.get(name) == id(timings) or not tuner.cache:
                continue
            self._taken[name] = id(timings)
            key = next(reversed(tuner.cache))
            configs = [{"config": describe(config), "ms": _median_ms(timing)} for config, timing in timings.items()]
            configs.sort(key=lambda c: (c["ms"] is None, c["ms"] or 0.0))
            records.append({"kernel": name, "key": [str(part) for part in key],
                            "best": describe(tuner.cache[key]), "configs": configs})
        return records


def markdown(records: list[dict]) -> list[str]:
    """A Markdown section: per kernel and key, the best config, its time, and how much slower the
    runner-up and the slowest were (the full lists are in the JSON)."""
    if not records:
        return []
    lines = ["## Triton autotuning", "",
             "Each config's time as the autotuner measured it (median); the JSON has every config.", "",
             "| kernel | key | configs | best | best ms | runner-up | slowest | could not run |",
             "|---|---|---|---|---|---|---|---|"]
    for record in records:
        ran = [c["ms"] for c in record["configs"] if c["ms"] is not None]
        failed = len(record["configs"]) - len(ran)
        best = min(ran) if ran else None
        second = f"{sorted(ran)[1] / best:.2f}×" if len(ran) > 1 and best else ""
        slowest = f"{max(ran) / best:.2f}×" if len(ran) > 1 and best else ""
        best_ms = f"{best:.3f}" if best is not None else ""
        key = ", ".join(dict.fromkeys(record["key"]))  # each pointer adds its dtype: say it once
        lines.append(f"| {record['kernel']} | {key} | {len(record['configs'])} | {record['best']} | {best_ms} | "
                     f"{second} | {slowest} | {failed or ''} |")
    return lines + [""]
