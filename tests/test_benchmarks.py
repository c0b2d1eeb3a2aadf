"""The benchmark harness end to end: ``python -m benchmarks.run --quick`` writes its three files.

One quick run (tiny size, one repeat, one thread so that a busy machine does not stall it), in a
subprocess from the repository root as a user runs it. It checks what the run leaves behind, not
the numbers it measured. About 30-50 s, most of it torch.compile of the compile peer.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases, measure

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--sizes", "64", "--threads", "1", "--device", "cpu",
         "--out", str(out), "--suffix=-quick"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_quick_run_writes_json_markdown_and_png(quick_run):
    out, _ = quick_run
    stems = {path.stem for path in out.iterdir()}
    assert len(stems) == 1, sorted(out.iterdir())
    stem = stems.pop()
    assert stem.startswith("cpu-") and stem.endswith("-quick")
    for ext in ("json", "md", "png"):
        assert (out / f"{stem}.{ext}").stat().st_size > 0
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_has_a_measured_row_per_loss_and_backend(quick_run):
    out, done = quick_run
    result = json.loads(next(out.glob("*.json")).read_text())
    meta = result["meta"]
    for key in ("torch", "python", "device_name", "cpu_model", "torch_threads", "git_commit", "command",
                "memory_method"):
        assert key in meta, key
    assert result["ceilings"]["matmul_fp32_flops"] > 0
    rows = {(r["loss"], r["backend"]): r for r in result["rows"]}
    for loss in cases.LOSSES:
        for backend in cases.default_backends(loss, torch.device("cpu")):
            row = rows.get((loss, backend))
            assert row is not None, f"no row for {loss} × {backend}"
            assert row["status"] == "ok", (loss, backend, row["status"], row.get("traceback"))
            assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd_bwd_peak_extra_mib"] >= 0
    # Every backend computes the same loss: the accuracy check against float64 says so, within
    # float32's tolerance (DESIGN §4; these inputs are float32).
    for entry in result["errors"]:
        assert entry["status"] == "ok", entry
        assert entry["rel_err_loss"] <= 1e-5 and entry["rel_err_grad"] <= 1e-5, entry
    markdown = next(out.glob("*.md")).read_text()
    assert "## contrastive, D = 32: forward + backward" in markdown
    assert done.stdout == ""  # progress goes to stderr
    assert "] structure-kl · chunked · D=32 · N=64: fwd " in done.stderr and "done in" in done.stderr


def _reused_peak_mib(queue):
    """In a benchmark worker's environment: the peak of 8 × 4 MB tensors, after the same tensors
    were allocated and freed before (glibc's heap would hand the freed memory back unseen)."""
    from benchmarks.measure import PeakMemory

    for _ in range(3):
        blocks = [torch.ones(1_000_000) for _ in range(8)]
        del blocks
    with PeakMemory(torch.device("cpu")) as memory:
        blocks = [torch.ones(1_000_000) for _ in range(8)]
    queue.put(memory.extra_mib)


def test_worker_resident_memory_sees_a_peak_in_reused_memory():
    from benchmarks import isolate

    worker = isolate.Worker(isolate.Spec("contrastive", "reference", "cpu", "float32", 0.0, 1, 1))
    try:
        context = isolate._context()  # the fork server the worker started, with its environment
        queue = context.Queue()
        process = context.Process(target=_reused_peak_mib, args=(queue,))
        process.start()
        peak = queue.get(timeout=120)
        process.join(30)
    finally:
        worker.close()
    assert 28 < peak < 40, peak  # 8 × 4 MB = 30.5 MiB


_FAULTS_OF_A_REUSED_BUFFER = r"""
import resource, torch
from benchmarks import measure

torch.set_num_threads(1)  # page faults of one thread's fills: glibc's heap settles at once

def faults(rounds=6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.ones(2**21)  # 8 MiB, allocated, touched and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
worker = faults()
with measure.heap_reuse():
    faults(12)
    reused = faults()
after = faults(1)
print(worker, reused, after)
"""


@pytest.mark.skipif(measure._glibc() is None, reason="not glibc: the benchmark leaves malloc as it is")
def test_timed_cpu_runs_reuse_the_heap_and_memory_runs_do_not():
    """The worker's setting (every large buffer its own mapping) faults every page of every new
    buffer in; heap_reuse, around the timed runs, lets glibc hand a freed buffer back unfaulted,
    and returns the free heap when it ends, so that the next memory run sees its buffers fault in
    again (a heap that kept them resident would hide that run's peak)."""
    from benchmarks import isolate

    assert measure._WORKER_MMAP_THRESHOLD == int(isolate.WORKER_ENV["MALLOC_MMAP_THRESHOLD_"])
    done = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_BUFFER], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, **isolate.WORKER_ENV))
    assert done.returncode == 0, done.stderr[-2000:]
    worker, reused, after = map(int, done.stdout.split())
    pages = 6 * (8 << 20) // 4096
    assert worker >= pages * 9 // 10, worker
    assert reused < pages // 10, reused
    assert after >= pages // 6 * 9 // 10, after  # one buffer's pages


def test_autotune_recorder_reports_each_tuning_once_fastest_first(monkeypatch):
    """What a GPU benchmark records of Triton's autotuning (benchmarks/autotune_log.py), from an
    autotuner given the state Triton leaves after timing three configs at one key."""
    import triton

    from benchmarks import autotune_log

    tuners = autotune_log.autotuners()
    assert "contrastive._lse_grad_kernel" in tuners and "structure._grad_kernel" in tuners
    tuner = tuners["contrastive._lse_grad_kernel"]
    slow = triton.Config({"BLOCK_A": 64, "BLOCK_B": 64}, num_warps=4, num_stages=2)
    fast = triton.Config({"BLOCK_A": 128, "BLOCK_B": 64}, num_warps=8, num_stages=3)
    failed = triton.Config({"BLOCK_A": 256, "BLOCK_B": 128}, num_warps=8, num_stages=4)
    recorder = autotune_log.Recorder()
    assert recorder.take() == []  # nothing timed yet (one config each under the interpreter)
    key = (384, 4096, "torch.bfloat16", "torch.bfloat16")
    monkeypatch.setattr(tuner, "cache", {(768, 1024, "torch.float16"): slow, key: fast})
    monkeypatch.setattr(tuner, "configs_timings", {slow: [2.5, 2.4, 2.6], failed: float("inf"), fast: [1.0, 0.9, 1.1]},
                        raising=False)
    records = recorder.take()
    assert records == [{
        "kernel": "contrastive._lse_grad_kernel", "key": ["384", "4096", "torch.bfloat16", "torch.bfloat16"],
        "best": "BLOCK_A=128 BLOCK_B=64 warps=8 stages=3",
        "configs": [{"config": "BLOCK_A=128 BLOCK_B=64 warps=8 stages=3", "ms": 1.0},
                    {"config": "BLOCK_A=64 BLOCK_B=64 warps=4 stages=2", "ms": 2.5},
                    {"config": "BLOCK_A=256 BLOCK_B=128 warps=8 stages=4", "ms": None}],
    }]
    assert recorder.take() == []  # reported once
    table = "\n".join(autotune_log.markdown(records))
    assert "| contrastive._lse_grad_kernel | 384, 4096, torch.bfloat16 | 3 |" in table
    assert "| 1.000 | 2.50× | 2.50× | 1 |" in table


def test_accuracy_table_has_every_backend_within_tolerance(tmp_path):
    """``python -m benchmarks.accuracy`` at tiny sizes: a row per loss and backend in every regime,
    the triton rows (interpreter) in float32, float16 and bfloat16 (its dot repaired), and the fused
    backends' errors within DESIGN §4's tolerances at random inputs (the eager reference's are not
    checked: it is the baseline; nor the aligned regime's, where 1 − r of a pearson loss near 0
    cancels)."""
    # TRITON_INTERPRET=1: the triton rows run on the CPU on a machine with CUDA too.
    done = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--n", "40", "--d", "16",
                           "--interpreter-n", "20", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("accuracy-cpu-*.json")
    rows = json.loads(result.read_text())["rows"]
    backends = {row["backend"] for row in rows}
    assert {"reference", "chunked", "triton"} <= backends
    assert {row["dtype"] for row in rows if row["backend"] == "triton"} == {"float32", "float16", "bfloat16"}
    assert {row["n"] for row in rows if row["backend"] == "triton"} == {20}
    tolerance = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
    for row in rows:
        if row["backend"] != "reference" and row["dtype"] in tolerance and row["regime"] == "random":
            assert max(row["loss_error"], row["grad_error"]) <= tolerance[row["dtype"]], row
    assert len(rows) == len({(r["regime"], r["loss"], r["backend"], r["dtype"]) for r in rows})  # each once
    table = result.with_suffix(".md").read_text()
    assert table.count("| structure kl | triton |") == 3 and "—" in table
    assert {row["regime"] for row in rows} == {"random", "aligned", "anisotropic"}
    assert {row["loss"] for row in rows} >= {"structure mse (tile)", "structure mse (gram)"}


def test_accuracy_rows_are_written_as_they_are_measured(tmp_path, monkeypatch):
    """A run stopped at a time limit (the GPU call's accuracy step) keeps the rows it measured."""
    from benchmarks import accuracy

    measured = []

    def measure(*args):
        if len(measured) == 3:
            raise KeyboardInterrupt("the step's time limit")
        measured.append(args)
        return 1e-7, 2e-7

    monkeypatch.setattr(accuracy, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main(["--n", "40", "--d", "16", "--interpreter-n", "0", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("accuracy-cpu-*.json")
    assert len(json.loads(result.read_text())["rows"]) == 3
    assert result.with_suffix(".md").read_text().count("1.0e-07 / 2.0e-07") == 3


@pytest.mark.parametrize("argv, message", [
    (["--backends", ","], "--backends: an empty list"),
    (["--losses", "contrastive,cosine"], "--losses: unknown name 'cosine'"),
    (["--backends", "chunked,turbo"], "--backends: unknown name 'turbo'"),
    (["--time-budget", "-1"], "--time-budget must be > 0"),
    (["--threads", "0"], "--threads >= 1"),
    (["--error-n", "2"], "--error-n must be 0 (no accuracy check) or N >= 3"),
])
def test_bad_arguments_stop_before_anything_runs(capsys, argv, message):
    from benchmarks import run

    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_repeated_names_run_once():
    from benchmarks import run

    args = run.parse_args(["--device", "cpu", "--losses", "contrastive,contrastive,structure-kl",
                           "--backends", "reference,chunked,reference"])
    assert args.losses == ["contrastive", "structure-kl"] and args.backends == ["reference", "chunked"]


@pytest.mark.parametrize("backend, device, second_warm_up", [
    ("native", "cpu", []),  # eager on the CPU: warm once per mode
    ("compile", "cpu", ["fwd_bwd"]),  # compiles again for a new shape
    ("triton", "cuda", ["fwd_bwd"]),  # autotunes again per size key
    ("memeff", "cuda", ["fwd_bwd"]),  # a peer's Triton autotuner, cuBLAS heuristics
])
def test_what_tunes_per_size_warms_up_at_every_size(backend, device, second_warm_up):
    """A warm-up skipped at a new N left Triton's autotuning (and its 256 MiB scratch buffer) inside
    the measured run on a GPU, in its time and peak memory."""
    from types import SimpleNamespace

    from benchmarks import isolate

    asked = []
    fake_cases = SimpleNamespace(make_inputs=lambda *args, **kwargs: None)
    fake_measure = SimpleNamespace(measure_case=lambda fn, inputs, device, modes, warm_up, **kw: asked.append(warm_up)
                                   or {})
    spec = isolate.Spec("contrastive", backend, device, "float32", 0.1, 1, 1)
    warm = set()
    for n in (64, 128):
        isolate._answer(("measure", n, 32, ["fwd_bwd"]), None, spec, torch.device(device), torch.float32, warm,
                        fake_cases, fake_measure, None)
    assert asked == [["fwd_bwd"], second_warm_up]


def test_compile_and_autotune_time_do_not_count_against_the_time_budget(monkeypatch):
    """A size whose request took 60 s (a GPU's autotuning, torch.compile) but whose runs took 2 s
    leaves the next size to the runs' prediction (8 s < 12 s): before, every larger size was skipped."""
    from types import SimpleNamespace

    from benchmarks import run

    clock = iter([0.0, 60.0, 100.0, 102.0])  # start and end of each size's request
    monkeypatch.setattr(run, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    runner = run.Runner(SimpleNamespace(sizes=[1024, 2048, 4096], time_budget=12.0, dtype="float32"),
                        torch.device("cpu"), {})
    monkeypatch.setattr(runner, "_fill", lambda row, answer, count, n, d: row.update(
        fwd_ms=500.0, fwd_bwd_ms=500.0, fwd_bwd_peak_extra_mib=1.0, pct_ceiling_fwd_bwd=50.0))

    def ask(request, timeout):  # timed runs of 0.5 s + 0.5 s at N = 1024, four times that at 2048
        spent = 0.5 * (request[1] // 1024) ** 2
        return {"status": "ok", "fwd": {"spent_s": spent}, "fwd_bwd": {"spent_s": spent}}

    runner._sizes(SimpleNamespace(ask=ask), run.Series("contrastive", "triton", 384), "x")
    assert [row["status"] for row in runner.rows][:2] == ["ok", "ok"]
    # the runs at 2048 (2 + 2 + 1 s) predict 20 s at 4096
    assert runner.rows[2]["status"].startswith("skipped: over time budget (predicted 20 s from N=2048")


def test_cuda_timings_keep_every_run(monkeypatch):
    """time_cuda keeps do_bench's runs (their number and spread reach the JSON), not one median
    with a repeat count made up from the time asked for."""
    import triton.testing

    asked = {}

    class NoMemory:
        extra_mib = 5.0

        def __init__(self, device):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def do_bench(fn, warmup, rep, return_mode):
        asked.update(rep=rep, mode=return_mode)
        return [3.0, 1.0, 2.0]

    monkeypatch.setattr(measure, "PeakMemory", NoMemory)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    timing = measure.time_cuda(lambda: None, torch.device("cuda"), min_time=0.2, min_repeats=3, max_repeats=50)
    assert (timing.median_ms, timing.repeats, timing.all_ms, timing.peak_extra_mib) == (2.0, 3, [1.0, 2.0, 3.0], 5.0)
    assert asked == {"rep": 200, "mode": "all"}
    monkeypatch.setattr(triton.testing, "do_bench", lambda *args, **kwargs: [float(t) for t in range(1000, 0, -1)])
    timing = measure.time_cuda(lambda: None, torch.device("cuda"), min_time=0.2, min_repeats=3, max_repeats=5)
    assert (timing.median_ms, timing.repeats) == (500.5, 1000)  # all the runs
    assert timing.all_ms == [1.0, 251.0, 501.0, 750.0, 1000.0]  # 5 of them kept, evenly


def test_the_demo_answers_help_without_running():
    """``--help`` printed nothing and ran the whole tour (minutes); unknown arguments are refused."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.demo", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "usage: python -m benchmarks.demo" in done.stdout
    assert "mmkd-kernels:" not in done.stdout  # the tour's first line
    bad = subprocess.run([sys.executable, "-m", "benchmarks.demo", "--bogus"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


def test_a_run_never_overwrites_an_earlier_one(tmp_path):
    """A second run of the day used to replace the first's files, which the README cites by name."""
    from benchmarks.result_files import free_stem

    assert free_stem(tmp_path, "cpu-x-2026-12-07") == "cpu-x-2026-12-07"
    (tmp_path / "cpu-x-2026-12-07.md").write_text("an earlier run")
    assert free_stem(tmp_path, "cpu-x-2026-12-07") == "cpu-x-2026-12-07-2"
    (tmp_path / "cpu-x-2026-12-07-2.png").write_bytes(b"")
    assert free_stem(tmp_path, "cpu-x-2026-12-07") == "cpu-x-2026-12-07-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-x-2026-12-07-2.png", "cpu-x-2026-12-07.md"]


def test_an_output_folder_that_cannot_be_written_stops_before_measuring(tmp_path, capsys, monkeypatch):
    from benchmarks import run

    monkeypatch.setattr(run.measure, "ceilings", lambda *a, **k: pytest.fail("measured before checking --out"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run.main(["--quick", "--losses", "contrastive", "--backends", "reference", "--device", "cpu",
                     "--out", str(blocker / "results")]) == 2
    assert f"--out {blocker / 'results'}: cannot write there" in capsys.readouterr().err


def test_a_run_cut_short_before_any_size_writes_no_plot(tmp_path, monkeypatch):
    """Interrupted before a size was measured: the JSON and Markdown say so; an empty figure used to
    raise inside matplotlib and lose the exit status 130."""
    from benchmarks import report

    result = {"schema": 1, "rows": [], "errors": [], "autotune": [], "ceilings": {},
              "meta": {"settings": {"losses": ["contrastive"]}}}
    monkeypatch.setattr(report, "markdown", lambda result, order: "partial")
    paths = report.write_all(result, tmp_path, "stem")
    assert sorted(paths) == ["json", "md"] and sorted(p.name for p in tmp_path.iterdir()) == ["stem.json", "stem.md"]


def test_the_memory_guess_grows_as_the_backend_does(monkeypatch):
    """N² for what materializes N×N, N for the others: a quadratic guess skipped linear backends on
    hosts of little memory."""
    from types import SimpleNamespace

    from benchmarks import run

    runner = run.Runner(SimpleNamespace(sizes=[1024, 8192], time_budget=1e9, dtype="float32"), torch.device("cpu"), {})
    monkeypatch.setattr(run, "_available_mib", lambda: 10_000.0)
    last = (1024, 0.01, 200.0)  # 200 MiB at N = 1024: 1.6 GiB at 8192 if linear, 12.5 GiB if quadratic
    assert runner._predicted_skip(run.Series("contrastive", "native", 384), 8192, last) is None
    skip = runner._predicted_skip(run.Series("contrastive", "reference", 384), 8192, last)
    assert skip.startswith("skipped: predicted out of memory (12.5 GiB")


def test_an_accuracy_truth_that_cannot_fit_stops_before_anything_runs(monkeypatch, capsys):
    """The float64 truth is made in the parent process: out of memory there lost the whole run."""
    from benchmarks import run

    monkeypatch.setattr(run, "_available_mib", lambda: 1024.0)
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cpu", "--error-n", "8192"])
    assert "--error-n 8192: its float64 truth needs about 4.0 GiB" in capsys.readouterr().err
    assert run.parse_args(["--device", "cpu", "--error-n", "1024"]).error_n == 1024
