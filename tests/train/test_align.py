"""The mutual-argmax aligner on hand-made similarities."""

import torch

from mmkd_train.align import align_batch, mutual_argmax


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
