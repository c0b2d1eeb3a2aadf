"""Batches: pairs -> the token ids and word ids that the student and the teacher need.

A batch of B pairs (x English, y target) gives

- ``s_input_ids``, ``s_attention_mask``, ``s_word_ids``: (2B, L) student tokens of [y_1..y_B, x_1..x_B],
  one tensor so that the student runs one forward;
- ``t_input_ids``, ``t_attention_mask``, ``t_word_ids``: (B, Lt) teacher tokens of x;
- ``src_id``: (B,) index of each x among the corpus's distinct English sentences (teacher cache);
- with TLM, ``tlm_input_ids``/``tlm_attention_mask``/``tlm_token_type_ids``/``tlm_labels``: (B, Lp)
  the pair (x, y) as one student input with 15% of its tokens masked (labels −100 elsewhere);
- when some pair of the batch carries a given word alignment (data.py), ``aligned``: (B,) bool, which
  pairs do, and ``given_links``: (P, 3) int64 rows (pair b, source word i, target word j) of those
  pairs' links whose two words kept a token after truncation.

Word ids count words from 0 within each sequence; −1 marks special tokens and padding. They are the
tokenizer's words (``word_ids()``, which splits off punctuation), except in the rows of a pair with
a given alignment (``t_word_ids`` of x and ``s_word_ids`` of y), where they are the whitespace-separated
words that the alignment's indices count, found from the tokens' character offsets.
"""

import bisect
import re

import torch
from torch.utils.data import Dataset

from .data import Pair, holdout_key


class PairDataset(Dataset):
    """Pairs as dicts; ``src_id`` is the index of the English side in ``sources``.

    ``sentence_keys`` number the English sides as ``data.holdout_key`` compares them: "User" and
    "user" are one input to an uncased teacher, so the sampler keeps them out of one batch too."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs
        self.sources = list(dict.fromkeys(pair.src for pair in pairs))
        index = {src: i for i, src in enumerate(self.sources)}
        self.src_ids = [index[pair.src] for pair in pairs]
        key_index: dict[str, int] = {}
        self.sentence_keys = [key_index.setdefault(holdout_key(pair.src), len(key_index)) for pair in pairs]
        # characters of both sides: a cheap proxy of token counts for grouping batches by length
        self.lengths = [len(pair.src) + len(pair.tgt) for pair in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        return {"src": pair.src, "tgt": pair.tgt, "src_id": self.src_ids[i], "alignment": pair.alignment}


def word_ids(encoding, rows: int) -> torch.Tensor:
    """(rows, L) int64 word index of each token from a fast tokenizer's encoding; −1 where none."""
    return torch.tensor(
        [[-1 if w is None else w for w in encoding.word_ids(i)] for i in range(rows)], dtype=torch.long
    )


def whitespace_word_ids(text: str, offsets: list, token_words: list) -> list[int]:
    """Index of the whitespace-separated word of ``text`` that each token comes from; −1 for tokens
    of no word (special tokens, padding: ``token_words`` None, as ``word_ids()`` gives them).

    offsets: (L,) (start, end) character spans of the tokens in ``text`` (a fast tokenizer's offset
    mapping). A token belongs to the word holding its first non-space character: span conventions
    differ between tokenizers (byte-level BPE's span starts at the space before the word), and a
    token that straddled two words (no whitespace-splitting tokenizer we know makes one) goes to the
    first.
    """
    starts = [match.start() for match in re.finditer(r"\S+", text)]
    ids = []
    for (start, end), word in zip(offsets, token_words):
        first = next((p for p in range(start, end) if not text[p].isspace()), None)
        ids.append(-1 if word is None or first is None else bisect.bisect_right(starts, first) - 1)
    return ids


def tokenize(tokenizer, texts: list[str], max_length: int, offsets: bool = False) -> dict:
    """ids, mask and word ids of ``texts``, padded to the longest; with ``offsets``, also
    ``whitespace_word_ids``: (len(texts), L) the tokens' whitespace-word indices."""
    encoding = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                         return_offsets_mapping=offsets)
    out = {
        "input_ids": encoding["input_ids"],
        "attention_mask": encoding["attention_mask"],
        "word_ids": word_ids(encoding, len(texts)),
    }
    if offsets:
        out["whitespace_word_ids"] = torch.tensor(
            [whitespace_word_ids(text, encoding["offset_mapping"][i].tolist(), encoding.word_ids(i))
             for i, text in enumerate(texts)], dtype=torch.long)
    return out


def given_alignment(items: list[dict], teacher: dict, student: dict) -> dict:
    """Switch the aligned pairs' rows to whitespace words and list their links (module doc).

    teacher, student: ``tokenize`` outputs (with offsets) of [x_1..x_B] and [y_1..y_B, x_1..x_B];
    their ``word_ids`` are overwritten in place for the aligned pairs' rows.
    """
    aligned = torch.tensor([item.get("alignment") is not None for item in items])
    links = []
    for row, item in enumerate(items):
        if item.get("alignment") is None:
            continue
        teacher["word_ids"][row] = teacher["whitespace_word_ids"][row]
        student["word_ids"][row] = student["whitespace_word_ids"][row]
        # words cut off by truncation have no token, hence no vector: their links are dropped
        src_words, tgt_words = set(teacher["word_ids"][row].tolist()), set(student["word_ids"][row].tolist())
        links += [(row, i, j) for i, j in item["alignment"] if i in src_words and j in tgt_words]
    del teacher["whitespace_word_ids"], student["whitespace_word_ids"]
    return {"aligned": aligned, "given_links": torch.tensor(links, dtype=torch.long).reshape(-1, 3)}


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
        given = any(item.get("alignment") is not None for item in items)
        student = tokenize(self.student_tokenizer, tgt + src, self.max_length, offsets=given)
        teacher = tokenize(self.teacher_tokenizer, src, self.max_length, offsets=given)
        links = given_alignment(items, teacher, student) if given else {}
        batch = {f"s_{k}": v for k, v in student.items()}
        batch.update({f"t_{k}": v for k, v in teacher.items()})
        batch.update(links)
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
