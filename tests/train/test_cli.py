"""The command line: bad input stops before any model loads; training writes a loadable model,
checkpoints that resume to the same losses, and the retrieval report."""

import json
import os

import pytest
import torch

from mmkd_train import cli, run


def tiny_args(corpus_file, teacher, student, out, *extra):
    return ["--data", corpus_file, "--teacher", teacher, "--student", student, "--output-dir", str(out),
            "--batch-size", "4", "--max-length", "16", "--eval-size", "6", "--eval-fraction", "0.25",
            "--logging-steps", "1", "--save-steps", "3", "--lr", "1e-3", *extra]


@pytest.mark.parametrize("argv, message", [
    (["--data", "nope.tsv"], "nope.tsv: no such data file"),
    (["--languages", "klingon"], "unknown language(s) klingon"),
    (["--teacher", "/no/such/model"], "--teacher /no/such/model: no such directory"),
    (["--student", "."], "--student .: not a transformers model directory"),
    (["--levels", "sentence,phrase"], "--levels must name some of"),
    (["--weights", "word=x"], "--weights: 'word=x' is not a number"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--eval-size", "-1"], "--eval-size must be 0 (no evaluation) or more, got -1"),
    (["--eval-fraction", "1"], "--eval-fraction must lie in [0, 1), got 1.0"),
    (["--warmup-ratio", "1"], "--warmup-ratio is a share of the steps in [0, 1), got 1.0"),
    (["--batch-size", "2"], "--batch-size 2 on 1 process(es) gives batches of 2 pairs; the levels sentence, word, "
                            "token, structure need 3"),
])
def test_bad_input_errors_before_any_model_loads(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(run, "load_teacher", lambda *a: pytest.fail("a model loaded"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_token_level_by_name_needs_one_tokenizer(monkeypatch, corpus_file, tiny_teacher, tiny_student, tmp_path, capsys):
    monkeypatch.setattr(run, "same_tokenization", lambda *a: False)
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path, "--levels", "token")) == 2
    assert "share a tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("length", ["1", "2"])
def test_max_length_must_leave_room_for_words(monkeypatch, corpus_file, tiny_teacher, tiny_student, tmp_path, capsys,
                                              length):
    """[CLS] and [SEP] alone give the word level nothing: it used to fail in the first step, with a traceback."""
    monkeypatch.setattr(run, "load_teacher", lambda *a: pytest.fail("a model loaded"))
    argv = tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path, "--max-length", length)
    assert cli.main(argv) == 2
    assert (f"--max-length {length} leaves no token for a sentence's words: the teacher's tokenizer adds 2 "
            "special tokens; use at least 3") in capsys.readouterr().err


def test_max_length_must_fit_the_models_positions(monkeypatch, corpus_file, tiny_teacher, tiny_student, tmp_path,
                                                 capsys):
    """The tiny models have 128 position embeddings: past them, the first long sentence stopped the
    run inside the model ("The expanded size of the tensor ..."), naming no option."""
    monkeypatch.setattr(run, "load_teacher", lambda *a: pytest.fail("a model loaded"))
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path, "--max-length", "129")) == 2
    assert ("--max-length 129 is more tokens than the teacher takes (128: its position embeddings and its "
            "tokenizer's model_max_length); use at most that") in capsys.readouterr().err


def test_a_step_without_aligned_words_is_an_error_not_a_traceback(tiny_teacher, tiny_student, tmp_path, capsys):
    """Every pair's given alignment empty: the word level's first step has no link to learn from."""
    from mmkd_train_test_support import make_pairs

    data = tmp_path / "xx.tsv"
    data.write_text("".join(f"{s}\t{t}\t\n" for s, t in make_pairs(20)), encoding="utf-8")
    argv = tiny_args(str(data), tiny_teacher, tiny_student, tmp_path / "out", "--eval-size", "0", "--max-steps", "1")
    assert cli.main(argv) == 2
    assert "mmkd-train: error: word level: no aligned word pair in this step's batch" in capsys.readouterr().err


def losses(directory):
    with open(os.path.join(directory, "trainer_state.json")) as handle:
        return {e["step"]: e["loss"] for e in json.load(handle)["log_history"] if "loss" in e}


class StopAfter3(run.MMKDTrainer):
    """A run killed right after its step-3 checkpoint."""

    def __init__(self, *args, **kwargs):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                control.should_training_stop = state.global_step >= 3

        super().__init__(*args, **kwargs)
        self.add_callback(Stop())


@pytest.mark.parametrize("batch", ["4", "16"], ids=["resumed-in-epoch-1", "resumed-in-epoch-2"])
def test_train_save_load_and_resume_to_the_same_losses(monkeypatch, corpus_file, tiny_teacher, tiny_student, tmp_path,
                                                       batch):
    """Killed after step 3 and resumed. With 16 pairs a batch an epoch is 2 steps, so step 3 is in the
    second epoch, whose order must come back as it was (it used to be drawn anew on resume)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    size = ("--max-steps", "6", "--batch-size", batch)
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, whole, *size)) == 0
    with monkeypatch.context() as patch:
        patch.setattr(run, "MMKDTrainer", StopAfter3)
        assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, cut, *size)) == 0
    assert sorted(p for p in os.listdir(cut) if p.startswith("checkpoint")) == ["checkpoint-3"]
    (cut / ".staging" / "checkpoint-100").mkdir(parents=True)  # left by a run killed while saving
    (cut / ".staging" / "checkpoint-100" / "model.safetensors").write_text("partial")
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, cut, *size, "--resume")) == 0
    assert not (cut / ".staging").exists()
    reference = losses(whole / "checkpoint-6")
    assert list(reference) == [1, 2, 3, 4, 5, 6]
    assert losses(cut / "checkpoint-6") == pytest.approx(reference, rel=1e-4)

    # no pickle of ours and no staging left behind; the model loads with AutoModel
    assert not [n for n in os.listdir(whole / "checkpoint-6") if n == "training_args.bin"]
    assert not (whole / ".staging").exists()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(whole / "model"), local_files_only=True)
    saved = AutoModel.from_pretrained(str(whole / "checkpoint-6"), local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    report = json.loads((whole / "retrieval.json").read_text())
    assert set(report["before"]) == set(report["after"]) == {"xx"} and report["steps"] == 6
    assert (whole / "retrieval.png").stat().st_size > 1000


def test_teacher_cache_run_matches_a_run_without(corpus_file, tiny_teacher, tiny_student, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    args = ("--max-steps", "3")
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, plain, *args)) == 0
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, cached, *args,
                              "--teacher-cache", str(tmp_path / "cache"))) == 0
    assert losses(cached / "checkpoint-3") == pytest.approx(losses(plain / "checkpoint-3"), rel=1e-4)


def test_wide_student_saves_its_head(corpus_file, tiny_teacher, wide_student, tmp_path):
    assert cli.main(tiny_args(corpus_file, tiny_teacher, wide_student, tmp_path, "--max-steps", "2",
                              "--levels", "sentence,word,structure")) == 0
    assert (tmp_path / "model" / "head.safetensors").is_file()
    assert (tmp_path / "checkpoint-2" / "head.safetensors").is_file()


def test_gradient_checkpointing_and_bf16_run(corpus_file, tiny_teacher, tiny_student, tmp_path):
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path, "--max-steps", "2",
                              "--gradient-checkpointing", "--bf16")) == 0
    assert all(v == v and abs(v) < 1e4 for v in losses(tmp_path / "checkpoint-2").values())


def test_an_unavailable_backend_is_refused_before_training(capsys):
    assert cli.main(["--backend", "nonesuch"]) == 2
    assert "--backend" in capsys.readouterr().err


def test_tlm_run_saves_a_masked_lm_student_and_refuses_one_without_a_head(
        corpus_file, tiny_teacher, tiny_mlm_student, tiny_student, tmp_path, capsys):
    from transformers import AutoModel

    out = tmp_path / "tlm"
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_mlm_student, out, "--max-steps", "2",
                              "--token-loss", "both")) == 0
    assert all(k > 0 for k in losses(out / "checkpoint-2").values())
    AutoModel.from_pretrained(str(out / "model"), local_files_only=True)
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path / "no", "--token-loss", "tlm")) == 2
    assert "masked-LM head" in capsys.readouterr().err


def test_given_alignments_train_the_word_level(tiny_teacher, tiny_student, tmp_path, capsys):
    from mmkd_train_test_support import make_pairs

    pairs = make_pairs(40)
    path = tmp_path / "xx.tsv"
    path.write_text("".join(f"{s}\t{t}\t{' '.join(f'{i}-{i}' for i in range(len(s.split())))}\n" for s, t in pairs)
                    + "bad\tline\t0-7\n", encoding="utf-8")
    out = tmp_path / "run"
    assert cli.main(tiny_args(str(path), tiny_teacher, tiny_student, out, "--max-steps", "2", "--levels", "word")) == 2
    assert "xx.tsv:41: alignment: link '0-7': target word 7 is out of range" in capsys.readouterr().err
    assert cli.main(tiny_args(str(path), tiny_teacher, tiny_student, out, "--max-steps", "2", "--levels", "word",
                              "--skip-bad-lines")) == 0
    assert all(0 < v < 1e4 for v in losses(out / "checkpoint-2").values())


def test_sentence_heads_are_saved_and_resume_to_the_same_losses(monkeypatch, corpus_file, tiny_teacher, tiny_student,
                                                                 tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModel

    heads = ("--sentence-loss", "mse", "--sentence-heads", "--head-width", "8", "--max-steps", "6")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, whole, *heads)) == 0
    with monkeypatch.context() as patch:
        patch.setattr(run, "MMKDTrainer", StopAfter3)
        assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, cut, *heads)) == 0
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, cut, *heads, "--resume")) == 0
    assert losses(cut / "checkpoint-6") == pytest.approx(losses(whole / "checkpoint-6"), rel=1e-4)
    saved = load_file(str(whole / "model" / "sentence_heads.safetensors"))
    assert saved["predictor.3.weight"].shape == (8, 8)
    assert not torch.equal(saved["projection.0.weight"],
                           load_file(str(cut / "checkpoint-3" / "sentence_heads.safetensors"))["projection.0.weight"])
    AutoModel.from_pretrained(str(whole / "model"), local_files_only=True)

    # heads asked for on resume from a checkpoint trained without them; heads without the mse form
    plain = tmp_path / "plain"
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, plain, "--max-steps", "3")) == 0
    capsys.readouterr()
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, plain, *heads, "--resume")) == 2
    assert "no sentence_heads.safetensors; this checkpoint was not trained with --sentence-heads" in capsys.readouterr().err
    assert cli.main(["--sentence-heads"]) == 2
    assert "--sentence-heads is a form of --sentence-loss mse" in capsys.readouterr().err



def test_a_last_batch_too_small_for_the_structure_level_is_left_out(corpus_file, tiny_teacher, tiny_student, tmp_path):
    """An epoch whose pairs leave 1 or 2 for its last batch: pearson needs 3 pairs to compare, so the
    last batch is left out (it used to fail the run at the end of the epoch)."""
    from mmkd_train.data import load_corpus

    pairs = len(load_corpus([corpus_file], None, [], eval_fraction=0.25, eval_size=0).train)
    batch = next(b for b in range(4, pairs) if pairs % b in (1, 2))
    argv = tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path, "--epochs", "1", "--eval-size", "0",
                     "--batch-size", str(batch), "--save-steps", "1", "--save-total-limit", "1")
    assert cli.main(argv) == 0
    assert [p for p in os.listdir(tmp_path) if p.startswith("checkpoint")] == [f"checkpoint-{pairs // batch}"]


def test_a_new_run_is_refused_where_an_earlier_one_left_checkpoints(monkeypatch, corpus_file, tiny_teacher,
                                                                    tiny_student, tmp_path, capsys):
    """Without the refusal the new run's checkpoints rotated away beside the old ones (the highest steps
    stay) and a later --resume continued the old run. Half-written ones under .staging do not count."""
    monkeypatch.setattr(run, "load_teacher", lambda *a: pytest.fail("a model loaded"))
    (tmp_path / ".staging" / "checkpoint-7").mkdir(parents=True)
    (tmp_path / "checkpoint-10").write_text("a file, not a checkpoint")
    monkeypatch.setattr(run, "run", lambda *a: 0)  # past the checks: no checkpoint folder yet
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path)) == 0
    for step in (100, 50):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path)) == 2
    assert (f"--output-dir {tmp_path} holds checkpoints of an earlier run (checkpoint-50, checkpoint-100): pass "
            "--resume to continue it, or choose another --output-dir") in capsys.readouterr().err
    assert cli.main(tiny_args(corpus_file, tiny_teacher, tiny_student, tmp_path, "--resume")) == 0


@pytest.mark.parametrize("token_loss, levels, kept", [
    ("both", ("sentence", "token"), "tlm"),
    ("contrastive", ("sentence",), "contrastive"),
])
def test_different_tokenizers_keep_what_they_can_of_the_token_level_and_say_so(token_loss, levels, kept):
    from mmkd_train.objective import Objective

    objective = Objective(levels=("sentence", "token"), token_loss=token_loss)
    resolved, said = run.resolve_levels(objective, explicit=False, same=False)
    assert (resolved.levels, resolved.token_loss) == (levels, kept)
    assert said.startswith("student and teacher tokenize differently: the token level")
    assert run.resolve_levels(objective, explicit=False, same=True) == (objective, None)
    tlm = Objective(levels=("token",), token_loss="tlm")
    assert run.resolve_levels(tlm, explicit=True, same=False) == (tlm, None)


def test_several_gpus_in_one_process_are_refused():
    """transformers would wrap the student in nn.DataParallel, whose replicas each return a tlm loss."""
    from types import SimpleNamespace

    with pytest.raises(run.ModelError, match="2 GPUs are visible to one process: run under torchrun --nproc-per-node"):
        run.check_devices(SimpleNamespace(world_size=1, n_gpu=2))
    run.check_devices(SimpleNamespace(world_size=1, n_gpu=1))
    run.check_devices(SimpleNamespace(world_size=2, n_gpu=1))
