"""Two gloo ranks on halves of a batch give the loss and gradients of one process on all of it.

Each rank collates its own half (its own padding, its own word and token counts, as under
torchrun); the gradients are averaged over ranks as DDP does.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmkd_kernels as mk
from mmkd_train_test_support import make_pairs
from mmkd_train.collate import Collator, PairDataset
from mmkd_train.data import Pair
from mmkd_train.models import SentenceHeads, Student, load_encoder, load_teacher, load_tokenizer, teacher_hidden
from mmkd_train.objective import Objective, mmkd_loss, word_contrastive

OBJECTIVES = [
    Objective(),  # sentence contrastive, structure pearson (gram across ranks), word, token
    Objective(sentence_loss="mse", structure_kind="kl", levels=("sentence", "structure", "word", "token")),
    Objective(structure_kind="mse", levels=("structure", "token")),
    Objective(sentence_loss="mse", sentence_heads=True, head_width=8, levels=("sentence", "word")),
]
PAIRS = 8


def crossed(src: str) -> tuple:
    n = len(src.split())
    return tuple(sorted({(i, n - 1 - i) for i in range(n)} | {(0, 0)}))


def loss_and_grads(teacher_path, student_path, indices, objective):
    tokenizer = load_tokenizer(teacher_path, "teacher")
    teacher = load_teacher(teacher_path)
    torch.manual_seed(0)  # the heads start alike on every rank, as DDP's broadcast makes them
    heads = SentenceHeads(teacher.config.hidden_size, objective.head_width) if objective.sentence_heads else None
    student = Student(load_encoder(student_path, masked_lm=False), teacher.config.hidden_size, heads).eval()
    # half the pairs carry a given word alignment (crossed, and source word 0 twice): the word level
    # then has more rows than columns, and its counts differ by rank
    dataset = PairDataset([Pair(s, t, "xx", crossed(s) if k % 2 else None)
                           for k, (s, t) in enumerate(make_pairs(PAIRS, seed=5))])
    batch = Collator(tokenizer, tokenizer, 32)([dataset[i] for i in indices])
    t = teacher_hidden(teacher, batch["t_input_ids"], batch["t_attention_mask"])
    out = student(**batch)
    loss, _ = mmkd_loss(out["hidden"], t, batch, objective, sentence_heads=heads,
                        sentence_predictions=out.get("sentence"))
    loss.backward()
    names = [n for n, p in student.named_parameters() if p.grad is not None]
    return loss.detach(), {n: p.grad for n, p in student.named_parameters() if n in names}


def worker(rank, world, teacher_path, student_path, out_dir):
    # A file rendezvous: a free TCP port picked by the parent can be taken before the ranks bind it.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    half = PAIRS // world
    from safetensors.torch import save_file

    for k, objective in enumerate(OBJECTIVES):
        loss, grads = loss_and_grads(teacher_path, student_path, range(rank * half, (rank + 1) * half), objective)
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world  # DDP averages gradients over ranks
        if rank == 0:
            save_file({"loss": (loss / world).reshape(1), **grads}, os.path.join(out_dir, f"{k}.safetensors"))
    # a rank without word links: its zero joins the collectives, the loss is that of the other's rows
    gen = torch.Generator().manual_seed(9)
    q, k, targets = torch.randn(3, 4, generator=gen), torch.randn(2, 4, generator=gen), torch.tensor([0, 1, 1])
    n = 3 if rank == 0 else 0
    q_local = q[:n].clone().requires_grad_()
    value = word_contrastive(q_local, k[: min(n, 2)], targets[:n], Objective(), dist.group.WORLD)
    value.backward()
    value = value.detach().clone()
    dist.all_reduce(value)
    outcome = {"zero-rank loss": float(value) / world}
    try:  # no link on any rank: an error on both, neither left waiting
        word_contrastive(q[:0], k[:0], targets[:0], Objective(), dist.group.WORLD)
        outcome["no links"] = "no error"
    except ValueError as error:
        outcome["no links"] = str(error)
    with open(os.path.join(out_dir, f"zero-links-{rank}.json"), "w") as handle:
        json.dump(outcome, handle)
    # Both ranks past their last collective before either closes its connections: a rank that
    # tore down first left the other's gloo thread on a closed socket, which aborted it (SIGABRT,
    # "terminate called without an active exception") in about one run in ten.
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_ranks_equal_one_process(tiny_teacher, tiny_student, tmp_path):
    from safetensors.torch import load_file

    mp.spawn(worker, args=(2, tiny_teacher, tiny_student, str(tmp_path)), nprocs=2, join=True)
    for k, objective in enumerate(OBJECTIVES):
        loss, grads = loss_and_grads(tiny_teacher, tiny_student, range(PAIRS), objective)
        ranks = load_file(str(tmp_path / f"{k}.safetensors"))
        torch.testing.assert_close(ranks.pop("loss")[0], loss, rtol=1e-5, atol=1e-6)
        assert set(ranks) == set(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(ranks[name], grad, rtol=1e-4, atol=1e-6, msg=f"{objective}: {name}")
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(3, 4, generator=gen), torch.randn(2, 4, generator=gen)
    alone = mk.contrastive_loss(q, k, targets=torch.tensor([0, 1, 1]), temperature=Objective().temperature)
    for rank in range(2):
        outcome = json.loads((tmp_path / f"zero-links-{rank}.json").read_text())
        assert outcome["zero-rank loss"] == pytest.approx(alone.item(), rel=1e-5)
        assert outcome["no links"].startswith("word level: no aligned word pair in this step's batch on any rank")
