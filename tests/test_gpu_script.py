"""benchmarks/gpu/run.sh, the one script a GPU session runs, dry: python3 and nvidia-smi are fakes
that answer at once (or sleep where a test needs time to pass), so that the script's own logic
(the steps, the call's time budget, the files that come back) is checked before any device time
is spent on it."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What the real commands leave behind, written where run.sh looks for it.
FAKE_PYTHON = r"""#!/usr/bin/env bash
built() { ls mmkd_kernels/_C*.so >/dev/null 2>&1 && echo yes || echo no; }
case "$1 ${2:-}" in
  "-c "*) case "$2" in
      *"import xdist"*|*"import pytest_timeout"*) exit 0 ;;
      *"has_cuda_kernels"*) exit 1 ;;
      *"import torch, triton"*) echo "torch fake"; exit 0 ;;
    esac ;;
  "setup.py "*) sleep "${FAKE_BUILD_SECONDS:-0}"; mkdir -p mmkd_kernels
                cp "$(type -P true)" mmkd_kernels/_C.cpython-312-x86_64-linux-gnu.so; exit 0 ;;
  "-m pytest") echo "args: $*"; echo "extension built: $(built)"; echo "3 passed"; exit 0 ;;
  "-m benchmarks.accuracy") mkdir -p "${@: -1}"; echo "# accuracy" > "${@: -1}/accuracy-cuda-x.md"; exit 0 ;;
  "-m benchmarks.run")
    for arg in "$@"; do [ "${prev:-}" = "--out" ] && out=$arg; prev=$arg; done
    echo "# bench autotune=$TRITON_PRINT_AUTOTUNING extension=$(built) blocks=${MMKD_GRAM_BLOCK_ELEMENTS:-} args: $*" \
      > "$out/cuda-x.md"
    sleep "${FAKE_BENCH_SECONDS:-0}"; exit 0 ;;
esac
echo "fake python3: unexpected $*" >&2
exit 3
"""


@pytest.fixture
def dry(tmp_path):
    """Runs run.sh with the given steps in a copy of its folder, fakes first on PATH."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "python3").write_text(FAKE_PYTHON)
    (fakes / "nvidia-smi").write_text("#!/bin/sh\necho fake GPU\n")
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    root = tmp_path / "repo"
    (root / "benchmarks" / "gpu").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "gpu" / "run.sh", root / "benchmarks" / "gpu")
    out, work = tmp_path / "out", tmp_path / "work"

    def run(*steps, **env):
        done = subprocess.run(["bash", "benchmarks/gpu/run.sh", *steps], cwd=root, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}", "OUT": str(out),
                                                "MMKD_GPU_WORK": str(work), **env})
        return done, out

    return run


def test_every_step_brings_its_files_back(dry):
    done, out = dry()  # no steps: the whole plan, as a GPU session runs it
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["build.log", "pytest.log", "accuracy.md", "goals.md", "contrastive.md", "symmetric.md", "structure.md",
         "gpu-run.tgz"])  # 8: all that the device tool returns
    assert "autotune=1" in (out / "structure.md").read_text()
    with tarfile.open(out / "gpu-run.tgz") as archive:
        names = archive.getnames()
    assert "./ext/_C.cpython-312-x86_64-linux-gnu.so" in names
    assert {"./env.txt", "./contrastive/cuda-x.md", "./symmetric/cuda-x.md", "./structure/cuda-x.md"} <= set(names)


def test_the_goals_tables_come_back_in_one_file(dry):
    done, out = dry("goals")
    assert done.returncode == 0, done.stdout + done.stderr
    tables = (out / "goals.md").read_text().splitlines()
    assert len(tables) == 4
    assert "--sizes 65536 --dims 768" in tables[0] and "inf-cl" in tables[0] and "blocks= " in tables[0]
    assert "structure-pearson --sizes 32768" in tables[1] and "reference" in tables[1]
    assert "blocks=2097152" in tables[2] and "blocks=4194304" in tables[3]
    assert all("--backends triton-gram " in table for table in tables[2:])


def test_the_build_runs_beside_the_goals_and_the_tests_wait_for_it(dry):
    # The fake build takes 3 s: the goals' benchmark starts before it ends, the tests after.
    done, out = dry("build", "goals", "test", FAKE_BUILD_SECONDS="3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "extension=no" in (out / "goals.md").read_text()
    log = (out / "pytest.log").read_text()
    assert "extension built: yes" in log and "--timeout=120" in log and "not chunked-cuda" in log
    assert done.stdout.index("build exit 0") < done.stdout.index("test: up to")  # the log's lines, echoed


def test_a_spent_budget_skips_the_remaining_parts(dry):
    # 48 s: the first part gets 33 s (the budget less 15 for the copies), takes 5, and then fewer than
    # 30 s are left: the other parts are skipped, and the call ends itself long before the budget.
    done, out = dry("contrastive", "symmetric", "structure", MMKD_GPU_BUDGET_S="48", FAKE_BENCH_SECONDS="5")
    assert done.returncode == 1, done.stderr
    assert "steps that failed or ran out of time: symmetric structure" in done.stdout
    assert "contrastive bench exit 0" in done.stdout
    assert "symmetric bench exit 124 (symmetric: skipped, the call's budget is spent)" in done.stdout
    assert "structure: skipped" in done.stdout
    assert (out / "contrastive.md").exists() and not (out / "symmetric.md").exists()


def test_a_failed_step_fails_the_call_and_the_others_still_run(dry, tmp_path):
    failing = tmp_path / "bin" / "python3"
    failing.write_text(failing.read_text().replace('echo "3 passed"; exit 0', 'echo "1 failed"; exit 1'))
    done, out = dry("test", "accuracy")
    assert done.returncode == 1 and "steps that failed or ran out of time: test" in done.stdout
    assert (out / "pytest.log").read_text().endswith("1 failed\n") and (out / "accuracy.md").exists()


def test_an_unknown_step_is_refused(dry):
    done, _ = dry("bild")
    assert done.returncode == 2 and "unknown step 'bild'" in done.stderr
