"""benchmarks/trainer_memory.py at a tiny size on the tiny models: both backends run in their own
process, agree on the loss, and the JSON and Markdown record them."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_trainer_memory_script_measures_both_backends(tiny_teacher, tiny_student, tmp_path):
    command = [sys.executable, "-m", "benchmarks.trainer_memory", "--teacher", tiny_teacher, "--student", tiny_student,
               "--batches", "3", "--max-length", "16", "--steps", "1", "--out", str(tmp_path), "--date", "2000-01-01"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[1/2] auto B=3" in done.stderr and "[2/2] reference B=3" in done.stderr  # progress is visible
    result = json.loads((tmp_path / "trainer-memory-2000-01-01.json").read_text())
    fused, reference = result["rows"]
    assert fused["status"] == reference["status"] == "ok"
    assert fused["backend"] == "auto" and fused["resolved_backend"] != "reference" and reference["backend"] == "reference"
    assert fused["n_tokens"] == reference["n_tokens"] == 3 * 16  # every English side fills max length
    assert abs(fused["first_step_loss"] - reference["first_step_loss"]) < 1e-4 * abs(reference["first_step_loss"])
    assert all(row["peak_extra_mib"] > 0 and row["step_s"] > 0 for row in (fused, reference))
    assert result["meta"]["torch"] and result["meta"]["date"] and result["meta"]["max_length"] == 16
    table = (tmp_path / "trainer-memory-2000-01-01.md").read_text()
    assert "| B (pairs) | N (tokens) |" in table and "\n| 3 | 48 | " in table


def test_a_size_predicted_to_exhaust_memory_is_skipped(monkeypatch):
    from benchmarks import trainer_memory

    monkeypatch.setattr(trainer_memory, "_available_mib", lambda: 10_000.0)
    last = {"n_tokens": 4096, "peak_extra_mib": 2_100.0, "status": "ok"}
    assert trainer_memory.predicted_skip("auto", 8192, last) is None  # linear: 4.2 GB of 10
    assert "predicted out of memory (8.2 GiB of 9.8 GiB free)" in trainer_memory.predicted_skip("reference", 8192, last)
    assert trainer_memory.predicted_skip("reference", 8192, None) is None
    # with the fused rows: the fused step at 8192 plus the reference's excess at 4096, times 4
    fused_last, fused_now = {"peak_extra_mib": 1_500.0}, {"peak_extra_mib": 3_000.0}
    assert trainer_memory.predicted_skip("reference", 8192, last, fused_now, fused_last) is None  # 5.4 GB of 10
    fused_now = {"peak_extra_mib": 6_500.0}
    assert "(8.7 GiB of 9.8 GiB free)" in trainer_memory.predicted_skip("reference", 8192, last, fused_now, fused_last)
