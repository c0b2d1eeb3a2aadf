"""The trainer's sampler: batches of similar lengths, each index once per epoch, and no English
sentence twice in one step's batch (its second copy would be a negative of the first)."""

import pytest

from mmkd_train.trainer import EpochSampler, separate_repeats


def _repeats(order, keys, step):
    return sum(len(order[i:i + step]) - len({keys[j] for j in order[i:i + step]}) for i in range(0, len(order), step))


def _corpus(sentences=463, languages=3, pairs=1315):
    """Keys and lengths shaped like the default corpus: each English sentence in several languages,
    whose pairs have similar lengths (so length grouping puts them side by side)."""
    keys = [k for k in range(sentences) for _ in range(languages)][:pairs]
    return keys, [10 + (k * 7) % 50 for k in keys]


@pytest.mark.parametrize("batch_size,world_size", [(32, 1), (8, 2), (5, 3)])
def test_a_step_holds_each_english_sentence_once(batch_size, world_size):
    keys, lengths = _corpus()
    plain = list(EpochSampler(batch_size, batch_size, lengths, seed=0, min_batch=3))
    assert _repeats(plain, keys, batch_size * world_size) > 0  # length grouping alone puts copies together
    sampler = EpochSampler(batch_size, batch_size, lengths, seed=0, min_batch=3, keys=keys, world_size=world_size)
    order = list(sampler)
    assert sorted(order) == sorted(plain) and len(set(order)) == len(order) == len(sampler)
    assert _repeats(order, keys, batch_size * world_size) == 0 and sampler.repeats == 0
    assert order == list(sampler)  # (seed, epoch) alone decide it
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_swaps_take_the_nearest_pair():
    """Length grouping is kept where it can be: a repeat changes places with the first later pair of
    another sentence, else (the last steps) the nearest earlier one that leaves no repeat in its
    own step."""
    order, keys = [0, 1, 2, 3, 4, 5], [7, 7, 8, 9, 9, 10]
    assert separate_repeats(order, keys, 2) == 0
    assert order == [0, 2, 1, 3, 4, 5]
    order, keys = [0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 11]
    assert separate_repeats(order, keys, 2) == 0  # the last step trades with the nearest earlier one
    assert order == [0, 1, 2, 5, 4, 3]


def test_repeats_no_swap_can_separate_are_counted_and_said():
    keys = [0] * 6 + [1, 2]
    order = list(range(8))
    assert separate_repeats(order, keys, 4) == 4  # four copies of sentence 0 for two steps of four
    assert _repeats(order, keys, 4) == 4 and sorted(order) == list(range(8))
    sampler = EpochSampler(4, 4, [5] * 8, seed=0, min_batch=3, keys=keys)
    with pytest.warns(RuntimeWarning, match="4 pairs share their English sentence"):
        list(sampler)
    assert sampler.repeats == 4


def test_a_sentence_with_more_copies_than_steps_costs_no_quadratic_search():
    """One sentence in 1% of 100k pairs, steps of 64: 15 copies more than the 1563 steps can
    separate. Each used to scan the whole order (40 s at 100k pairs, hours at 1M); now a window."""
    import random
    import time

    rng = random.Random(0)
    keys = [0 if rng.random() < 0.01 else 1 + i for i in range(100_000)]
    order = list(range(len(keys)))
    rng.shuffle(order)
    started = time.perf_counter()
    left = separate_repeats(order, keys, 64)
    assert time.perf_counter() - started < 10
    assert sorted(order) == list(range(len(keys)))
    assert left == _repeats(order, keys, 64) and left < 0.01 * len(keys)


def test_case_variants_are_one_sentence_to_the_sampler():
    """An uncased teacher embeds "User" and "user" alike: in one batch, one would be the other's
    false negative."""
    from mmkd_train.collate import PairDataset
    from mmkd_train.data import Pair

    dataset = PairDataset([Pair("User", "Benutzer", "de"), Pair("user", "utilisateur", "fr"), Pair("Delete?", "x", "de"),
                           Pair("Delete", "y", "fr"), Pair("Save", "z", "de")])
    assert dataset.src_ids == [0, 1, 2, 3, 4]  # the teacher cache keeps every exact sentence
    assert dataset.sentence_keys == [0, 0, 1, 1, 2]
