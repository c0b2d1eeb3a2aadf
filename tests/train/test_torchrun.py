"""The command line under torchrun: two gloo ranks on CPU train the tiny models and save them.

    torchrun --standalone --nproc-per-node 2 -m mmkd_train ...

(run as ``python -m torch.distributed.run``, which is what the ``torchrun`` script calls, so that
the test uses this interpreter whatever PATH holds).
"""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from mmkd_train_test_support import make_pairs, write_tsv
from mmkd_train.data import holdout_score

TRAIN, HELD, BATCH = 16, 4, 4


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_torchrun_two_ranks_train_and_save(tiny_teacher, tiny_student, tmp_path):
    # 16 training pairs and 4 held out (the split goes by a hash of the English side): one epoch of
    # batches of 4 is 4 steps in one process and 2 steps when two ranks share the data
    pairs = make_pairs(80, seed=7)
    train = [p for p in pairs if holdout_score(p[0]) >= 0.25][:TRAIN]
    held = [p for p in pairs if holdout_score(p[0]) < 0.25][:HELD]
    assert len(train) == TRAIN and len(held) == HELD
    data = write_tsv(tmp_path / "xx.tsv", train + held)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mmkd_train",
        "--data", data, "--teacher", tiny_teacher, "--student", tiny_student, "--output-dir", str(out),
        "--batch-size", str(BATCH), "--epochs", "1", "--max-length", "16", "--eval-size", str(HELD),
        "--eval-fraction", "0.25", "--logging-steps", "1", "--save-steps", "2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "retrieval.json").read_text())
    assert report["world_size"] == 2 and report["train_pairs"] == TRAIN and set(report["after"]) == {"xx"}
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    # both ranks took part: each stepped through half of the epoch's batches
    assert state["global_step"] == report["steps"] == TRAIN // (2 * BATCH)
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 2 and all(0 < entry["loss"] < 1e4 for entry in logged)
    from transformers import AutoModel

    AutoModel.from_pretrained(str(out / "model"), local_files_only=True)
