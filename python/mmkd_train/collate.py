"""Batches: pairs -> the token ids and word ids that the student and the teacher need.

A batch of B pairs (x English, y target) gives

- ``s_input_ids``, ``s_attention_mask``, ``s_word_ids``: (2B, L) student tokens of [y_1..y_B, x_1..x_B],
  one tensor so that the student runs one forward;
- ``t_input_ids``, ``t_attention_mask``, ``t_word_ids``: (B, Lt) teacher tokens of x;
- ``src_id``: (B,) index of each x among the corpus's distinct English sentences (teacher cache);
- with TLM, ``tlm_input_ids``/``tlm_attention_mask``/``tlm_token_type_ids``/``tlm_labels``: (B, Lp)
  the pair (x, y) as one student input with 15% of its tokens masked (labels −100 elsewhere).

Word ids count words from 0 within each sequence; −1 marks special tokens and padding.
"""

import torch
from torch.utils.data import Dataset

from .data import Pair


class PairDataset(Dataset):
    """Pairs as dicts; ``src_id`` is the index of the English side in ``sources``."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs
        self.sources = list(dict.fromkeys(pair.src for pair in pairs))
        index = {src: i for i, src in enumerate(self.sources)}
        self.src_ids = [index[pair.src] for pair in pairs]
        # characters of both sides: a cheap proxy of token counts for grouping batches by length
        self.lengths = [len(pair.src) + len(pair.tgt) for pair in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        return {"src": pair.src, "tgt": pair.tgt, "src_id": self.src_ids[i]}


def word_ids(encoding, rows: int) -> torch.Tensor:
    """(rows, L) int64 word index of each token from a fast tokenizer's encoding; −1 where none."""
    return torch.tensor(
        [[-1 if w is None else w for w in encoding.word_ids(i)] for i in range(rows)], dtype=torch.long
    )


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict:
    """ids, mask and word ids of ``texts``, padded to the longest."""
    encoding = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {
        "input_ids": encoding["input_ids"],
        "attention_mask": encoding["attention_mask"],
        "word_ids": word_ids(encoding, len(texts)),
    }


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, tokenizer, probability: float):
    """BERT's masking: ``probability`` of the non-special tokens are targets; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with −100 off target)."""
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape) < probability) & ~special
    labels[~chosen] = -100
    ids = input_ids.clone()
    to_mask = chosen & (torch.rand(input_ids.shape) < 0.8)
    ids[to_mask] = tokenizer.mask_token_id
    to_random = chosen & ~to_mask & (torch.rand(input_ids.shape) < 0.5)
    ids[to_random] = torch.randint(len(tokenizer), input_ids.shape)[to_random]
    return ids, labels


class Collator:
    """Callable for ``Trainer``'s data loader: list of PairDataset items -> batch dict (module doc)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, max_length: int, tlm: bool = False,
                 mlm_probability: float = 0.15):
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.max_length = max_length
        self.tlm = tlm
        self.mlm_probability = mlm_probability
        if tlm and student_tokenizer.mask_token_id is None:
            raise ValueError("--token-loss tlm needs a student tokenizer with a mask token")

    def __call__(self, items: list[dict]) -> dict:
        src = [item["src"] for item in items]
        tgt = [item["tgt"] for item in items]
        student = tokenize(self.student_tokenizer, tgt + src, self.max_length)
        teacher = tokenize(self.teacher_tokenizer, src, self.max_length)
        batch = {f"s_{k}": v for k, v in student.items()}
        batch.update({f"t_{k}": v for k, v in teacher.items()})
        batch["src_id"] = torch.tensor([item["src_id"] for item in items], dtype=torch.long)
        if self.tlm:
            pair = self.student_tokenizer(src, tgt, padding=True, truncation=True, max_length=2 * self.max_length,
                                          return_tensors="pt", return_special_tokens_mask=True)
            special = pair["special_tokens_mask"].bool() | (pair["attention_mask"] == 0)
            ids, labels = mask_tokens(pair["input_ids"], special, self.student_tokenizer, self.mlm_probability)
            batch.update(tlm_input_ids=ids, tlm_attention_mask=pair["attention_mask"], tlm_labels=labels)
            if "token_type_ids" in pair:
                batch["tlm_token_type_ids"] = pair["token_type_ids"]
        return batch
