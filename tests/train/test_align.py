"""The mutual-argmax aligner on hand-made similarities; given alignments and their word units."""

import pytest
import torch

from mmkd_train.align import align_batch, mutual_argmax
from mmkd_train.collate import Collator, tokenize, whitespace_word_ids
from mmkd_train.models import load_tokenizer


def test_mutual_argmax_keeps_only_pairs_that_choose_each_other():
    similarity = torch.tensor([
        [0.9, 0.1, 0.0],   # 0 -> 0, and column 0's best row is 0: kept
        [0.2, 0.3, 0.8],   # 1 -> 2, but column 2's best row is 2: dropped
        [0.1, 0.2, 0.95],  # 2 -> 2, kept
        [0.0, 0.6, 0.1],   # 3 -> 1, column 1's best row is 3: kept
    ])
    assert mutual_argmax(similarity).tolist() == [[0, 0], [2, 2], [3, 1]]
    assert mutual_argmax(torch.empty(0, 3)).shape == (0, 2)


def test_align_batch_aligns_within_each_pair_and_returns_global_rows():
    # pair 0: 2 source words, 2 target words, crossed; pair 1: 1 source word, 2 target words
    e = torch.eye(3)
    source = torch.stack([e[0], e[1], e[2]])
    target = torch.stack([e[1], e[0], e[0], e[2]])
    links = align_batch(source, torch.tensor([2, 1]), target, torch.tensor([2, 2]))
    # pair 1's source word (row 2) matches target row 3, never pair 0's rows even where equal vectors
    assert links.tolist() == [[0, 1], [1, 0], [2, 3]]


def test_given_links_replace_mutual_argmax_for_their_pairs_only():
    e = torch.eye(3)
    source = torch.stack([e[0], e[1], e[2]])
    target = torch.stack([e[1], e[0], e[0], e[2]])
    aligned = torch.tensor([True, False])
    # pair 0 is given the links that mutual argmax would not pick (0-0, 1-1: the words are crossed)
    given = torch.tensor([[0, 0, 0], [0, 1, 1]])
    links = align_batch(source, torch.tensor([2, 1]), target, torch.tensor([2, 2]), aligned, given)
    assert links.tolist() == [[0, 0], [1, 1], [2, 3]]
    with pytest.raises(ValueError, match="pair 0: a link points past"):
        align_batch(source, torch.tensor([2, 1]), target, torch.tensor([2, 2]), aligned, torch.tensor([[0, 2, 0]]))


def test_whitespace_words_from_offsets_differ_from_the_tokenizers_words(tiny_teacher):
    tokenizer = load_tokenizer(tiny_teacher, "teacher")
    out = tokenize(tokenizer, ["don't stop, now"], 16, offsets=True)
    assert tokenizer.convert_ids_to_tokens(out["input_ids"][0]) == ["[CLS]", "don", "'", "t", "stop", ",", "now", "[SEP]"]
    assert out["word_ids"][0].tolist() == [-1, 0, 1, 2, 3, 4, 5, -1]  # the tokenizer splits punctuation
    assert out["whitespace_word_ids"][0].tolist() == [-1, 0, 0, 0, 1, 1, 2, -1]
    # byte-level BPE spans start at the space before the word: the word is that of the first non-space
    assert whitespace_word_ids("ab cd", [(0, 0), (0, 2), (2, 4), (4, 5), (0, 0)], [None, 0, 1, 1, None]) == [-1, 0, 1, 1, -1]


def test_collator_switches_aligned_pairs_to_whitespace_words_and_drops_truncated_links(tiny_teacher):
    tokenizer = load_tokenizer(tiny_teacher, "teacher")
    items = [
        {"src": "stop, now", "tgt": "halt jetzt", "src_id": 0, "alignment": ((0, 0), (1, 1))},
        {"src": "don't go", "tgt": "geh nicht", "src_id": 1, "alignment": None},
        # 5 words, of which only the first 3 keep a token at max_length 5 ([CLS] + 3 + [SEP])
        {"src": "a b c d e", "tgt": "v w x y z", "src_id": 2, "alignment": ((0, 4), (2, 2), (4, 0))},
    ]
    batch = Collator(tokenizer, tokenizer, 5)(items)
    assert batch["aligned"].tolist() == [True, False, True]
    assert batch["given_links"].tolist() == [[0, 0, 0], [0, 1, 1], [2, 2, 2]]
    assert batch["t_word_ids"][0].tolist() == [-1, 0, 0, 1, -1]  # "stop," is one word
    assert batch["t_word_ids"][1].tolist() == [-1, 0, 1, 2, -1]  # unaligned: the tokenizer's words
    plain = Collator(tokenizer, tokenizer, 5)([dict(item, alignment=None) for item in items])
    assert "aligned" not in plain and plain["t_word_ids"][0].tolist() == [-1, 0, 1, 2, -1]
