"""Tiny models and generated pairs for the trainer's tests (the fixtures are in conftest.py).

A module of its own name, not conftest: tests/ has a conftest.py too, and a process spawned by a
test (test_ddp.py) imports whichever ``conftest`` comes first on its path.
"""

import random

EN = ["red", "blue", "green", "house", "car", "tree", "dog", "cat", "big", "small", "old", "new", "river", "door"]
XX = ["rot", "blau", "gruen", "haus", "auto", "baum", "hund", "katze", "gross", "klein", "alt", "neu", "fluss", "tuer"]


def make_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` distinct (English, fake-language) sentence pairs of 2 to 5 words, word by word."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < count:
        idx = [rng.randrange(len(EN)) for _ in range(rng.randint(2, 5))]
        src = " ".join(EN[i] for i in idx)
        if src not in seen:
            seen.add(src)
            pairs.append((src, " ".join(XX[i] for i in idx)))
    return pairs


def write_tsv(path, pairs) -> str:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return str(path)


def make_tiny_model(directory, hidden: int = 32, seed: int = 0, masked_lm: bool = False) -> str:
    """A random BERT with the MiniLM tokenizer saved to ``directory``; returns its path."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    from mmkd_train.models import default_teacher_path

    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path(), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = (BertForMaskedLM if masked_lm else BertModel)(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
