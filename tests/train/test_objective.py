"""Each level of the MMKD objective: finite, gradients to the student only, the teacher untouched."""

import pytest
import torch

import mmkd_kernels as mk
from mmkd_train_test_support import make_pairs
from mmkd_train.collate import Collator, PairDataset
from mmkd_train.data import Pair
from mmkd_train.models import (ModelError, SentenceHeads, Student, load_encoder, load_teacher, load_tokenizer,
                               teacher_hidden)
from mmkd_train.objective import BatchError, Objective, mmkd_loss, words

FORMS = [
    ("sentence", dict(sentence_loss="contrastive")),
    ("sentence", dict(sentence_loss="mse")),
    ("word", {}),
    ("token", dict(structure_kind="pearson")),
    ("token", dict(structure_kind="kl")),
    ("structure", dict(structure_kind="kl")),
    ("structure", dict(structure_kind="pearson")),
    ("structure", dict(structure_kind="mse")),
]


def setup(teacher_path, student_path, tlm=False, count=8):
    tokenizer = load_tokenizer(teacher_path, "teacher")
    teacher = load_teacher(teacher_path)
    student = Student(load_encoder(student_path, masked_lm=tlm), teacher.config.hidden_size)
    dataset = PairDataset([Pair(s, t, "xx") for s, t in make_pairs(count)])
    torch.manual_seed(0)
    batch = Collator(tokenizer, tokenizer, 32, tlm=tlm)([dataset[i] for i in range(count)])
    return teacher, student, batch


def step(teacher, student, batch, objective):
    out = student(**batch)
    t = teacher_hidden(teacher, batch["t_input_ids"], batch["t_attention_mask"])
    return mmkd_loss(out["hidden"], t, batch, objective, out.get("tlm"))


@pytest.mark.parametrize("level, form", FORMS, ids=[f"{l}-{'-'.join(f.values()) or 'default'}" for l, f in FORMS])
def test_each_level_is_finite_and_trains_the_student_only(tiny_teacher, tiny_student, level, form):
    teacher, student, batch = setup(tiny_teacher, tiny_student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss, parts = step(teacher, student, batch, Objective(levels=(level,), **form))
    assert set(parts) == {level} and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in student.encoder.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_weights_scale_the_total_and_all_levels_combine(tiny_teacher, tiny_student):
    teacher, student, batch = setup(tiny_teacher, tiny_student)
    student.eval()
    weights = {"sentence": 0.5, "word": 2.0, "token": 0.25, "structure": 3.0}
    loss, parts = step(teacher, student, batch, Objective(weights=weights))
    assert set(parts) == set(weights)
    assert torch.allclose(loss, sum(weights[k] * v for k, v in parts.items()))


def test_a_wider_student_gets_a_head_that_learns(tiny_teacher, wide_student):
    teacher, student, batch = setup(tiny_teacher, wide_student)
    assert student.head.weight.shape == (32, 48)
    loss, _ = step(teacher, student, batch, Objective(levels=("sentence", "word", "structure")))
    loss.backward()
    assert student.head.weight.grad.abs().sum() > 0


def test_tlm_trains_a_masked_lm_student(tiny_teacher, tiny_mlm_student):
    teacher, student, batch = setup(tiny_teacher, tiny_mlm_student, tlm=True)
    assert (batch["tlm_labels"] != -100).any()
    loss, parts = step(teacher, student, batch, Objective(levels=("token",), token_loss="tlm"))
    assert torch.isfinite(loss)
    loss.backward()
    assert student.model.cls.predictions.transform.dense.weight.grad.abs().sum() > 0


def test_tlm_refuses_a_student_without_a_masked_lm_head(tiny_student):
    with pytest.raises(ModelError, match="masked-LM head.*has none"):
        load_encoder(tiny_student, masked_lm=True)


def test_word_level_pairs_the_words_of_a_given_alignment(tiny_teacher, tiny_student):
    """Given links, here crossed (source word i to target word n-1-i) and one-to-many (source word 0
    also to target word 0), decide which word vectors are paired; mutual argmax pairs others."""
    tokenizer = load_tokenizer(tiny_teacher, "teacher")
    teacher = load_teacher(tiny_teacher)
    student = Student(load_encoder(tiny_student, masked_lm=False), teacher.config.hidden_size).eval()
    items = []
    for k, (src, tgt) in enumerate(make_pairs(6, seed=3)):
        n = len(src.split())
        links = tuple(sorted({(i, n - 1 - i) for i in range(n)} | {(0, 0)}))
        items.append({"src": src, "tgt": tgt, "src_id": k, "alignment": links})
    objective = Objective(levels=("word",))
    batch = Collator(tokenizer, tokenizer, 32)(items)
    with torch.no_grad():
        hidden = student(**batch)["hidden"]
    t = teacher_hidden(teacher, batch["t_input_ids"], batch["t_attention_mask"])
    _, parts = mmkd_loss(hidden, t, batch, objective)

    b = len(items)
    t_words, t_count = words(t, batch["t_word_ids"])
    s_words, s_count = words(hidden[:b], batch["s_word_ids"][:b])
    assert t_count.tolist() == [len(item["src"].split()) for item in items]  # whitespace words
    t_start, s_start = torch.cumsum(t_count, 0) - t_count, torch.cumsum(s_count, 0) - s_count
    rows = torch.tensor([(int(t_start[k]) + i, int(s_start[k]) + j)
                         for k, item in enumerate(items) for i, j in item["alignment"]])
    columns, targets = torch.unique(rows[:, 0], return_inverse=True)
    assert columns.shape[0] < rows.shape[0]  # a teacher word with two links is one column
    expected = mk.contrastive_loss(s_words[rows[:, 1]], t_words[columns], targets=targets,
                                   temperature=objective.temperature)
    torch.testing.assert_close(parts["word"], expected)

    plain = Collator(tokenizer, tokenizer, 32)([dict(item, alignment=None) for item in items])
    with torch.no_grad():
        plain_hidden = student(**plain)["hidden"]
    _, argmax_parts = mmkd_loss(plain_hidden,
                                teacher_hidden(teacher, plain["t_input_ids"], plain["t_attention_mask"]), plain,
                                objective)
    assert abs(argmax_parts["word"].item() - parts["word"].item()) > 1e-3


def test_sentence_heads_train_with_the_student_behind_a_stop_gradient(tiny_teacher, tiny_student):
    """The paper's sentence form: gradient reaches the encoder, the projection and the predictor;
    none reaches the teacher or flows through the target's projection (stop-gradient)."""
    tokenizer = load_tokenizer(tiny_teacher, "teacher")
    teacher = load_teacher(tiny_teacher)
    torch.manual_seed(0)
    heads = SentenceHeads(32, width=16)
    student = Student(load_encoder(tiny_student, masked_lm=False), 32, heads)
    dataset = PairDataset([Pair(s, t, "xx") for s, t in make_pairs(8)])
    batch = Collator(tokenizer, tokenizer, 32)([dataset[i] for i in range(8)])
    objective = Objective(levels=("sentence",), sentence_loss="mse", sentence_heads=True, head_width=16)
    t = teacher_hidden(teacher, batch["t_input_ids"], batch["t_attention_mask"]).requires_grad_()
    out = student(**batch)
    assert out["sentence"].shape == (16, 16)
    loss, parts = mmkd_loss(out["hidden"], t, batch, objective, sentence_heads=heads,
                            sentence_predictions=out["sentence"])
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert t.grad is None and all(p.grad is None for p in teacher.parameters())
    for module in (student.encoder.encoder, heads.projection, heads.predictor):
        assert all(p.grad is not None for p in module.parameters())
        assert any(p.grad.abs().sum() > 0 for p in module.parameters())

    # the projection's gradient is that of the prediction side alone: the target is a constant
    got = [p.grad.clone() for p in heads.projection.parameters()]
    student.zero_grad()
    b = 8
    tx = (t * batch["t_attention_mask"][..., None]).sum(1) / batch["t_attention_mask"].sum(1, keepdim=True)
    constant = heads.projection(tx).detach()
    again = student(**batch)["sentence"]
    (torch.nn.functional.mse_loss(again[:b], constant) + torch.nn.functional.mse_loss(again[b:], constant)).backward()
    for g, p in zip(got, heads.projection.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_sentence_heads_are_refused_without_heads_on_the_student(tiny_teacher, tiny_student):
    teacher, student, batch = setup(tiny_teacher, tiny_student)
    with pytest.raises(ValueError, match="no sentence heads"):
        step(teacher, student, batch, Objective(levels=("sentence",), sentence_loss="mse", sentence_heads=True))


def test_a_batch_without_any_word_link_is_an_error(tiny_teacher, tiny_student):
    tokenizer = load_tokenizer(tiny_teacher, "teacher")
    teacher = load_teacher(tiny_teacher)
    student = Student(load_encoder(tiny_student, masked_lm=False), 32)
    items = [{"src": s, "tgt": t, "src_id": k, "alignment": ()} for k, (s, t) in enumerate(make_pairs(4))]
    batch = Collator(tokenizer, tokenizer, 32)(items)
    with pytest.raises(BatchError, match="word level: no aligned word pair in this step.s batch"):
        step(teacher, student, batch, Objective(levels=("word",)))
