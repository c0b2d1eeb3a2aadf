"""The teacher cache: equal to running the teacher, reused when its key matches, rebuilt when not."""

import os
from pathlib import Path

import torch

from mmkd_train_test_support import make_pairs
from mmkd_train import cache
from mmkd_train.collate import Collator, PairDataset
from mmkd_train.data import Pair
from mmkd_train.models import load_teacher, load_tokenizer, teacher_hidden


def test_cached_states_equal_the_teachers_and_the_key_decides_reuse(tiny_teacher, tmp_path):
    tokenizer, teacher = load_tokenizer(tiny_teacher, "teacher"), load_teacher(tiny_teacher)
    dataset = PairDataset([Pair(s, t, "xx") for s, t in make_pairs(12)])
    key = cache.cache_key(tiny_teacher, tokenizer, dataset.sources, 32)
    build = lambda: cache.compute_states(teacher, tokenizer, dataset.sources, 32, batch_size=5)
    built, what = cache.load_or_build(str(tmp_path), key, build)
    assert what == "built" and sorted(os.listdir(tmp_path)) == [cache.FILENAME]

    batch = Collator(tokenizer, tokenizer, 32)([dataset[i] for i in (3, 0, 7, 11)])
    direct = teacher_hidden(teacher, batch["t_input_ids"], batch["t_attention_mask"])
    looked_up = built.lookup(batch["src_id"], batch["t_attention_mask"])
    mask = batch["t_attention_mask"].bool()
    torch.testing.assert_close(looked_up[mask], direct[mask], rtol=1e-5, atol=1e-5)

    reused, what = cache.load_or_build(str(tmp_path), key, lambda: 1 / 0)
    assert what == "reused" and torch.equal(reused.states, built.states)
    for changed in ({**key, "max_length": "16"}, {**key, "data": "other"}, {**key, "teacher": "other"}):
        _, what = cache.load_or_build(str(tmp_path), changed, build)
        assert what.startswith("rebuilt (") and [k for k in key if key[k] != changed[k]][0] in what
    (tmp_path / cache.FILENAME).write_bytes(b"torn")
    _, what = cache.load_or_build(str(tmp_path), key, build)
    assert what.startswith("rebuilt (unreadable")
    assert sorted(os.listdir(tmp_path)) == [cache.FILENAME]


def test_the_key_follows_teacher_weights_tokenizer_data_and_length(tiny_teacher, tiny_student):
    tokenizer = load_tokenizer(tiny_teacher, "teacher")
    key = cache.cache_key(tiny_teacher, tokenizer, ["a", "b"], 32)
    assert key == cache.cache_key(tiny_teacher, tokenizer, ["a", "b"], 32)
    assert key["teacher"] != cache.cache_key(tiny_student, tokenizer, ["a", "b"], 32)["teacher"]
    assert key["data"] != cache.cache_key(tiny_teacher, tokenizer, ["a", "c"], 32)["data"]


def test_the_tokenizer_digest_ignores_call_options_and_follows_the_splitting(tiny_teacher):
    """A fast tokenizer rewrites its truncation and padding entries on its first call with them: the
    key must not change with that (a needless rebuild, said to be for a changed tokenizer), but must
    with anything that splits sentences differently."""
    from tokenizers import normalizers

    tokenizer = load_tokenizer(tiny_teacher, "teacher")
    before = cache.cache_key(tiny_teacher, tokenizer, ["a"], 32)["tokenizer"]
    tokenizer(["a sentence", "another one"], padding=True, truncation=True, max_length=8)
    assert '"truncation":null' not in tokenizer.backend_tokenizer.to_str().replace(" ", "")  # it did change
    assert cache.cache_key(tiny_teacher, tokenizer, ["a"], 32)["tokenizer"] == before
    tokenizer.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    assert cache.cache_key(tiny_teacher, tokenizer, ["a"], 32)["tokenizer"] != before


def test_a_stored_key_of_another_shape_and_a_failed_write(tmp_path, monkeypatch):
    """A cache whose stored key is JSON but not an object is rebuilt, not a traceback; a write that
    fails (a full disk) leaves no staging file behind."""
    from safetensors.torch import save_file

    states = cache.TeacherCache(torch.zeros(3, 2), torch.tensor([0, 1, 3]))
    path = tmp_path / cache.FILENAME
    save_file({"states": states.states, "offsets": states.offsets}, str(path), metadata={"key": "[1]"})
    _, what = cache.load_or_build(str(tmp_path), {"data": "x"}, lambda: states)
    assert what.startswith("rebuilt (unreadable: its key is not a JSON object")

    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    path.unlink()
    try:
        cache.load_or_build(str(tmp_path), {"data": "x"}, lambda: states)
    except OSError as error:
        assert "No space left" in str(error)
    else:
        raise AssertionError("the failed write raised nothing")
    assert os.listdir(tmp_path) == []
