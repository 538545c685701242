"""Length batching, shared by score (teacher-forced scoring) and evaluate (beam search)."""

import numpy as np

from mtprune.batching import length_batches


def as_lists(batches: list[np.ndarray]) -> list[list[int]]:
    return [b.tolist() for b in batches]


def test_sorted_by_the_first_size_then_the_next_and_cut_at_the_padded_budget() -> None:
    tgt = np.array([5, 2, 2, 9, 3])
    src = np.array([1, 1, 4, 2, 2])
    # order by (tgt, src): 1 (2+1), 2 (2+4), 4 (3+2), 0 (5+1), 3 (9+2); padded cost = longest total x count
    # [1, 2]: 6 x 2 = 12; adding 4 would be 6 x 3 = 18; [4, 0]: 6 x 2 = 12; adding 3: 11 x 3 = 33
    assert as_lists(length_batches(np.arange(5), [tgt, src], 12)) == [[1, 2], [4, 0], [3]]
    # with src first: 1 (1+2), 0 (1+5), 4 (2+3), 3 (2+9), 2 (4+2)
    assert as_lists(length_batches(np.arange(5), [src, tgt], 12)) == [[1, 0], [4], [3], [2]]


def test_an_example_over_the_budget_gets_a_batch_of_its_own() -> None:
    sizes = np.array([3, 50, 3, 3])
    assert as_lists(length_batches(np.arange(4), [sizes], 9)) == [[0, 2, 3], [1]]


def test_equal_lengths_keep_their_order_and_only_the_given_indices_are_batched() -> None:
    sizes = np.array([4, 4, 1, 4, 4, 4])
    assert as_lists(length_batches(np.array([5, 3, 0, 4]), [sizes], 8)) == [[5, 3], [0, 4]]
    assert length_batches(np.array([], dtype=np.int64), [sizes], 8) == []


def test_every_index_once_and_every_batch_within_budget() -> None:
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 60, 500), rng.integers(1, 60, 500)
    indices = rng.permutation(500)[:321]
    batches = length_batches(indices, [tgt, src], 300)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == sorted(indices.tolist())
    for b in batches:
        assert len(b) == 1 or int((src[b] + tgt[b]).max()) * len(b) <= 300
    # a batch could not have taken the next example without going over budget
    for b, nxt in zip(batches[:-1], batches[1:], strict=True):
        grown = np.append(b, nxt[0])
        assert int((src[grown] + tgt[grown]).max()) * len(grown) > 300
    keys = list(zip(tgt[flat].tolist(), src[flat].tolist(), strict=True))
    assert keys == sorted(keys)


def test_score_and_evaluate_use_the_shared_helper() -> None:
    import mtprune.scoring.forward as score
    import mtprune.stages.evaluate as evaluate

    assert score.length_batches is length_batches and evaluate.length_batches is length_batches
