"""The real default models (MiniLM-L6 teacher, a copy as student) on Django's catalogs, a few steps."""

import json
import subprocess
import sys

from mmkd_train import cli


def test_default_models_train_evaluate_and_save(tmp_path):
    out = tmp_path / "run"
    argv = ["--languages", "de", "--eval-languages", "it", "--max-steps", "3", "--batch-size", "8",
            "--eval-size", "16", "--output-dir", str(out), "--save-steps", "3", "--logging-steps", "1"]
    assert cli.main(argv) == 0
    report = json.loads((out / "retrieval.json").read_text())
    assert report["trained_languages"] == ["de"] and set(report["after"]) == {"de", "it"}
    assert all(0 <= report[when][lang][k] <= 1 for when in ("before", "after") for lang in ("de", "it")
               for k in ("tgt2en", "en2tgt"))
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert {"loss_sentence", "loss_word", "loss_token", "loss_structure"} <= set(logged[0])

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(out / "model"), device="cpu")
    vectors = model.encode(["Yes", "Ja", "Passwort"])
    assert vectors.shape == (3, 384)


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "mmkd_train", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--teacher-cache" in done.stdout and "--structure-kind" in done.stdout
