"""The benchmark: every loss × backend × N side by side, in one run, against ceilings measured in it.

    python -m benchmarks.run                       # CUDA if there is one, else CPU; all losses, backends
    python -m benchmarks.run --device cpu          # what `make bench` runs (under 10 minutes on 2 cores)
    python -m benchmarks.run --quick --out /tmp/b  # tiny sizes, one repeat: checks the harness itself
    python -m benchmarks.run --losses contrastive --backends reference,chunked --sizes 4096,8192

For each loss × backend × D × N: forward time (no_grad) and forward + backward time (the
student's gradient; the teacher is frozen), the peak memory the call adds over its inputs, FLOP/s
against DESIGN §5's counts and the matmul ceiling measured in the same run; and, once per loss ×
backend, the relative error of the loss and of the student's gradient against the float64
reference at the largest N ≤ 4096. A backend that runs out of memory or time is recorded as such
and its larger sizes are skipped; nothing crashes the run. Writes
``<out>/<device-slug>-<date>.{json,md,png}`` (never over an earlier run's: a second run of the day
takes ``-2``, ``-3``, ...); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import signal
import sys
import time
from pathlib import Path

import torch

from benchmarks import cases, isolate, measure, report, result_files
from mmkd_kernels import chunked, gram

CPU_SIZES = (1024, 2048, 4096, 8192, 16384)
GPU_SIZES = (4096, 16384, 65536, 262144)
QUICK_SIZES = (64, 128)
QUICK_D = 32
ERROR_MAX_N = 4096  # the float64 reference materializes N×N matrices: keep its truth cheap


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark the MMKD losses: time, peak extra memory, FLOP/s and accuracy of every "
                    "backend and peer, side by side, into <out>/<device>-<date>.{json,md,png}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the losses run")
    parser.add_argument("--sizes", type=_csv(int), default=None,
                        help=f"comma list of N (default CPU {','.join(map(str, CPU_SIZES))}; "
                             f"GPU {','.join(map(str, GPU_SIZES))}; --quick {','.join(map(str, QUICK_SIZES))})")
    parser.add_argument("--dims", type=_csv(int), default=None,
                        help=f"comma list of widths D of student and teacher (default 384; --quick {QUICK_D})")
    parser.add_argument("--losses", type=_csv(str), default=list(cases.LOSSES),
                        help=f"comma list of {', '.join(cases.LOSSES)}")
    parser.add_argument("--backends", type=_csv(str), default=None,
                        help="comma list of " + ", ".join(cases.ALL_BACKENDS) + " (default: every one that "
                             "can run each loss on the device; -gram = the structure loss's gram algorithm; "
                             "compile = the reference math under torch.compile; mnrl = sentence-transformers' "
                             "MultipleNegativesRankingLoss; inf-cl and memeff on CUDA when installed)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the inputs")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one repeat: checks that the harness works, measures nothing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--suffix", default="",
                        help="appended to the files' name (<device>-<date><suffix>.json/.md/.png), e.g. "
                             "--suffix=-n16384-kl for a partial run beside the day's full one")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds per measurement (one loss × backend × N, warm-up and repeats): a "
                             "backend whose next size is predicted to exceed it, or that exceeded it, skips "
                             "its larger sizes (default CPU 30, GPU 60, --quick 120)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed runs per mode, at least 3 runs (default CPU 0.5, GPU 0.2)")
    parser.add_argument("--max-repeats", type=int, default=15, help="most timed runs per mode on the CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--error-n", type=int, default=None,
                        help=f"N of the accuracy check (default: the largest size <= {ERROR_MAX_N}; 0: none)")
    args = parser.parse_args(argv)
    _fill_defaults(parser, args)
    return args


def _fill_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else GPU_SIZES if gpu else CPU_SIZES)
    if args.dims is None:
        args.dims = [QUICK_D if args.quick else 384]
    if not args.sizes or min(args.sizes) < 3 or not args.dims or min(args.dims) < 1:
        parser.error("--sizes must be N >= 3 (pearson needs 3 rows) and --dims D >= 1")
    args.sizes, args.dims = sorted(set(args.sizes)), sorted(set(args.dims))
    for option, names, known in (("--losses", args.losses, cases.LOSSES), ("--backends", args.backends, cases.ALL_BACKENDS)):
        if names is None:
            continue
        if not names:
            parser.error(f"{option}: an empty list (leave the option out for the default)")
        for name in names:
            if name not in known:
                parser.error(f"{option}: unknown name {name!r} (one of {', '.join(known)})")
    # Each series once, in the order given: a repeated name ran its series twice, and the tables
    # (one row per backend and N) showed only the second run while the JSON kept both.
    args.losses = list(dict.fromkeys(args.losses))
    args.backends = list(dict.fromkeys(args.backends)) if args.backends is not None else None
    if args.time_budget is None:
        args.time_budget = 120.0 if args.quick else 60.0 if gpu else 30.0
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 0.2 if gpu else 0.5
    if args.time_budget <= 0 or args.min_time < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--time-budget must be > 0, --min-time >= 0 and --threads >= 1")
    args.min_repeats, args.max_repeats = (1, 1) if args.quick else (3, max(args.max_repeats, 3))
    if args.error_n is None:
        fitting = [n for n in args.sizes if n <= ERROR_MAX_N]
        args.error_n = max(fitting) if fitting else min(ERROR_MAX_N, min(args.sizes))
    if args.error_n != 0 and args.error_n < 3:
        parser.error(f"--error-n must be 0 (no accuracy check) or N >= 3 (pearson needs 3 rows), got {args.error_n}")
    # The float64 truth is made in this process: one that cannot fit would lose the whole run, not a
    # series. The reference structure losses peak at about 8 N×N matrices (508 MiB at N = 4096 in
    # float32 in the committed CPU runs); in float64, 8 bytes each.
    available = _available_mib() if not gpu else None
    truth_mib = 8 * args.error_n**2 * 8 / 2**20
    if available is not None and truth_mib > 0.7 * available:
        parser.error(f"--error-n {args.error_n}: its float64 truth needs about {truth_mib / 1024:.1f} GiB, more "
                     f"than this machine has free ({available / 1024:.1f} GiB); choose a smaller N or 0")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# One series: a loss × backend × D over the sizes, in one worker process
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Series:
    loss: str
    backend: str
    d: int


class Runner:
    """Asks workers for measurements in order and decides what to skip."""

    def __init__(self, args: argparse.Namespace, device: torch.device, ceilings: dict):
        self.args, self.device, self.ceilings = args, device, ceilings
        self.dtype = getattr(torch, args.dtype)
        self.element_size = torch.empty((), dtype=self.dtype).element_size()
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.autotune: list[dict] = []  # Triton's tunings, per series and size (benchmarks/autotune_log.py)
        self.done = 0
        self.total = 0

    def _progress(self, what: str, text: str) -> None:
        self.done += 1
        log(f"[{self.done:3d}/{self.total}] {what}: {text}")

    def _spec(self, series: Series) -> isolate.Spec:
        a = self.args
        return isolate.Spec(series.loss, series.backend, str(self.device), a.dtype, a.min_time,
                            a.min_repeats, a.max_repeats, a.threads)

    def _hard_timeout(self) -> float:
        # Generous: the first request of a worker also pays imports and torch.compile.
        return 3 * self.args.time_budget + 180

    def run_series(self, series: Series, truth) -> None:
        what = f"{series.loss} · {series.backend} · D={series.d}"
        worker = isolate.Worker(self._spec(series))
        try:
            if truth is not None:
                self._accuracy(worker, series, truth, what)
                if not worker.alive:
                    worker.close()
                    worker = isolate.Worker(self._spec(series))
            self._sizes(worker, series, what)
        finally:
            worker.close()

    def _accuracy(self, worker, series: Series, truth, what: str) -> None:
        n = self.args.error_n
        ref_loss, ref_grad = truth
        start = time.perf_counter()
        answer = worker.ask(("errors", n, series.d, ref_loss.cpu().numpy(), ref_grad.cpu().numpy()),
                            self._hard_timeout())
        wall = time.perf_counter() - start
        entry = {"loss": series.loss, "backend": series.backend, "d": series.d, "n": n, "status": answer["status"],
                 "rel_err_loss": answer.get("rel_err_loss"), "rel_err_grad": answer.get("rel_err_grad")}
        if "traceback" in answer:  # as a failed size keeps its own
            entry["traceback"] = answer["traceback"]
        self.errors.append(entry)
        text = (f"rel. error loss {entry['rel_err_loss']:.1e}, gradient {entry['rel_err_grad']:.1e}"
                if entry["status"] == "ok" else entry["status"])
        self._progress(f"{what} · accuracy N={n}", f"{text} [{wall:.1f} s]")

    def _sizes(self, worker, series: Series, what: str) -> None:
        blocked = None  # once set, the reason every larger size is skipped
        last = None  # (n, seconds of runs, peak MiB) of the last measured size
        for n in self.args.sizes:
            count = cases.counts(series.loss, series.backend, n, series.d, self.element_size)
            row = {"loss": series.loss, "backend": series.backend,
                   "algorithm": cases.algorithm_of(series.loss, series.backend),
                   "n": n, "d": series.d, "dtype": self.args.dtype, **dataclasses.asdict(count)}
            status = blocked or self._predicted_skip(series, n, last)
            if status is not None:
                row["status"] = status
                blocked = blocked or status
                self.rows.append(row)
                self._progress(f"{what} · N={n}", status)
                continue
            start = time.perf_counter()
            answer = worker.ask(("measure", n, series.d, ("fwd", "fwd_bwd")), self._hard_timeout())
            wall = time.perf_counter() - start
            row["wall_s"] = round(wall, 2)
            row["status"] = answer["status"]
            if answer["status"] != "ok":
                if "traceback" in answer:
                    row["traceback"] = answer["traceback"]
                blocked = f"skipped: failed at N={n} ({answer['status'][:80]})"
                self.rows.append(row)
                self._progress(f"{what} · N={n}", answer["status"])
                continue
            self._fill(row, answer, count, n, series.d)
            self.rows.append(row)
            self.autotune += [{"loss": series.loss, "backend": series.backend, "n": n, "d": series.d, **record}
                              for record in answer.get("autotune", [])]
            # The next size's cost is predicted from the runs themselves, without compilation
            # and start-up: every timed run plus one warm-up run of each mode.
            runs_s = answer["fwd"]["spent_s"] + answer["fwd_bwd"]["spent_s"] + (row["fwd_ms"] + row["fwd_bwd_ms"]) / 1e3
            last = (n, runs_s, row["fwd_bwd_peak_extra_mib"])
            # The runs, not the request's wall time: a GPU's first request at a size also autotunes
            # (minutes at large N) and torch.compile compiles, which would skip every larger size.
            # The hard timeout and run.sh's step limits bound that time.
            if runs_s > self.args.time_budget:
                blocked = (f"skipped: over time budget (N={n}'s runs took {runs_s:.0f} s > "
                           f"{self.args.time_budget:.0f} s)")
            self._progress(f"{what} · N={n}",
                           f"fwd {report.fmt_ms(row['fwd_ms'])}, fwd+bwd {report.fmt_ms(row['fwd_bwd_ms'])} "
                           f"({row['pct_ceiling_fwd_bwd']:.0f}% of ceiling), "
                           f"+{report.fmt_mib(row['fwd_bwd_peak_extra_mib'])} [{wall:.1f} s]")

    def _predicted_skip(self, series: Series, n: int, last) -> str | None:
        """A reason to skip size n from the last measured size, or None to measure it."""
        if last is None:
            return None
        last_n, last_runs_s, last_mib = last
        ratio = (cases.counts(series.loss, series.backend, n, series.d, 1).flops_fwd_bwd
                 / cases.counts(series.loss, series.backend, last_n, series.d, 1).flops_fwd_bwd)
        predicted = last_runs_s * ratio
        if predicted > self.args.time_budget:
            return (f"skipped: over time budget (predicted {predicted:.0f} s from N={last_n}, "
                    f"budget {self.args.time_budget:.0f} s)")
        if self.device.type == "cpu":
            # Never start what would page out the whole machine. Memory grows as N² where the
            # backend materializes N×N (reference, compile, mnrl), else as N: a quadratic guess for
            # every backend skipped linear ones on hosts of little memory.
            need = last_mib * (n / last_n) ** (2 if cases.materializes(series.backend) else 1)
            available = _available_mib()
            if available is not None and need > 0.7 * available:
                return f"skipped: predicted out of memory ({need / 1024:.1f} GiB of {available / 1024:.1f} GiB free)"
        return None

    def _fill(self, row: dict, answer: dict, count: cases.Counts, n: int, d: int) -> None:
        peak = measure.peak_flops(self.ceilings, n, d, self.dtype, self.device)
        bandwidth = self.ceilings["copy_bytes_per_s"]
        for mode in ("fwd", "fwd_bwd"):
            timing = answer[mode]
            seconds = timing["median_ms"] / 1e3
            flops = getattr(count, f"flops_{mode}")
            row[f"{mode}_ms"] = timing["median_ms"]
            row[f"{mode}_repeats"] = timing["repeats"]
            row[f"{mode}_times_ms"] = [round(t, 3) for t in timing["all_ms"]]
            row[f"{mode}_peak_extra_mib"] = timing["peak_extra_mib"]
            row[f"achieved_flops_{mode}"] = flops / seconds
            row[f"pct_ceiling_{mode}"] = 100 * flops / seconds / peak
            # DESIGN §5: the floor is the larger of compute at the ceiling and bytes at bandwidth.
            row[f"floor_ms_{mode}"] = 1e3 * max(flops / peak, getattr(count, f"bytes_{mode}") / bandwidth)
        row["ceiling_flops"] = peak


def _available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace, device: torch.device) -> tuple[list[Series], list[str]]:
    """The series to run, and notes on backends asked for that cannot run here."""
    series, notes = [], []
    for loss in args.losses:
        wanted = args.backends or cases.default_backends(loss, device)
        for name in wanted:
            reason = cases.unavailable_reason(loss, name, device)
            if reason is not None:
                if args.backends:  # asked for by name: say why it is absent
                    notes.append(f"{loss} · {name}: {reason}")
                continue
            series += [Series(loss, name, d) for d in args.dims]
    return series, notes


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # `timeout` and job schedulers stop a run with SIGTERM: treat it as Ctrl-C, so that what was
    # measured until then is still written.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    date = datetime.date.today()
    series, notes = plan(args, device)
    for note in notes:
        log(f"not run: {note}")
    if not series:
        log("nothing to run")
        return 2

    # Where the files go, decided and checked before anything is measured: an output folder that
    # cannot be written lost a whole run at its end, and a second run of the day overwrote the first.
    try:
        stem = result_files.free_stem(args.out, report.file_stem(device, date) + args.suffix)
    except OSError as error:
        log(f"--out {args.out}: cannot write there ({error})")
        return 2
    try:
        log(f"measuring the ceilings of {report.device_name(device)} ...")
        ceilings = measure.ceilings(device, args.sizes, args.dims, chunked.row_block, quick=args.quick)
    except KeyboardInterrupt:
        log("interrupted before anything was measured: no files written")
        return 130
    log("  " + ", ".join(report.ceiling_summary(ceilings)))

    runner = Runner(args, device, ceilings)
    runner.total = len(series) * (len(args.sizes) + (1 if args.error_n else 0))
    truths: dict = {}
    interrupted = False
    try:
        for item in series:
            truth = None
            if args.error_n:
                key = (item.loss, item.d)
                if key not in truths:
                    student, teacher = cases.make_inputs(args.error_n, item.d, seed=isolate.ERROR_SEED,
                                                         dtype=runner.dtype, device=device)
                    truths[key] = tuple(x.cpu() for x in cases.truth(item.loss, student, teacher))
                    del student, teacher
                    if device.type == "cuda":  # give the cached N×N float64 blocks back to the workers
                        torch.cuda.empty_cache()
                truth = truths[key]
            runner.run_series(item, truth)
    except KeyboardInterrupt:  # keep what was measured: the files say the run was cut short
        interrupted = True
        log("interrupted: writing what was measured so far")

    report.add_speedups(runner.rows)
    meta = report.environment(device)
    meta.update(
        memory_method=measure.memory_method(device),
        timing_method="triton.testing.do_bench median" if device.type == "cuda"
        else "time.perf_counter per run, median",
        settings={"sizes": args.sizes, "dims": args.dims, "losses": args.losses,
                  "backends": sorted({s.backend for s in series}, key=cases.ALL_BACKENDS.index),
                  "dtype": args.dtype, "quick": args.quick, "time_budget_s": args.time_budget,
                  "min_time_s": args.min_time, "min_repeats": args.min_repeats, "max_repeats": args.max_repeats,
                  "error_n": args.error_n, "rotating_sets": isolate.ROTATING_SETS,
                  "gram_block_elements": gram.block_elements(),
                  "contrastive_temperature": cases.CONTRASTIVE_TEMPERATURE,
                  "structure_temperature": cases.STRUCTURE_TEMPERATURE},
        not_run=notes,
        interrupted=interrupted,
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    result = {"schema": 1, "meta": meta, "ceilings": ceilings, "rows": runner.rows, "errors": runner.errors,
              "autotune": runner.autotune}
    paths = report.write_all(result, args.out, stem, cases.ALL_BACKENDS)
    log(f"done in {meta['elapsed_s']:.0f} s: " + ", ".join(str(p) for p in paths.values()))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
