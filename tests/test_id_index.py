"""The hot-row cache's id -> slot table (op/id_index.py), against a dict doing the same."""

import numpy as np
import pytest

from remote_predict.op.id_index import IdIndex


def check_same(index: IdIndex, reference: dict[int, int], rng: np.random.Generator) -> None:
    held = np.array(list(reference), np.int64)
    absent = rng.integers(0, 1 << 40, 200)
    asked = np.concatenate([held, absent[~np.isin(absent, held)]])
    rng.shuffle(asked)
    expected = np.array([reference.get(int(i), -1) for i in asked], np.int64)
    assert np.array_equal(index.find(asked), expected)
    ids, slots = index.items()
    assert len(index) == len(reference) == len(ids)
    assert dict(zip(ids.tolist(), slots.tolist(), strict=True)) == reference


def test_finds_what_a_dict_would_through_inserts_removals_and_rebuilds():
    rng = np.random.default_rng(0)
    capacity = 500
    index, reference = IdIndex(capacity), {}
    for step in range(300):
        if len(reference) > capacity - 50 or (reference and rng.random() < 0.4):
            gone = rng.choice(np.array(list(reference), np.int64), min(len(reference), rng.integers(1, 60)),
                              replace=False)
            index.remove(gone)
            for i in gone.tolist():
                del reference[i]
        else:
            new = np.unique(rng.integers(0, 5_000, rng.integers(0, 50)))
            new = new[~np.isin(new, np.array(list(reference), np.int64))]
            slots = rng.integers(0, capacity, len(new))
            index.insert(new, slots)
            reference.update(zip(new.tolist(), slots.tolist(), strict=True))
        if step % 10 == 0:
            check_same(index, reference, rng)
    check_same(index, reference, rng)


def test_ids_that_share_a_home_position_are_all_found():
    index = IdIndex(64)
    candidates = np.arange(100_000, dtype=np.int64)
    homes = index._home(candidates)
    ids = candidates[homes == homes[0]][:30]  # 30 ids that all hash to the same position: one long run
    assert len(ids) == 30
    index.insert(ids, np.arange(30))
    assert np.array_equal(index.find(ids), np.arange(30))
    index.remove(ids[::2])  # holes in the run: the ids after them must still be found
    assert np.array_equal(index.find(ids), np.where(np.arange(30) % 2, np.arange(30), -1))
    index.insert(ids[::2], np.arange(30, 45))  # and the holes reused
    assert np.array_equal(index.find(ids), np.where(np.arange(30) % 2, np.arange(30), 30 + np.arange(30) // 2))


def test_refuses_more_ids_than_its_capacity_negative_ids_and_removing_what_it_does_not_hold():
    index = IdIndex(4)
    index.insert(np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match="cannot hold 5"):
        index.insert(np.array([9]), np.array([0]))
    with pytest.raises(ValueError, match=">= 0"):
        IdIndex(4).insert(np.array([-3]), np.array([0]))
    with pytest.raises(KeyError, match="7"):
        index.remove(np.array([1, 7]))
    assert np.array_equal(index.find(np.arange(5)), [0, 1, 2, 3, -1])  # a refused call changed nothing


def test_an_empty_index_finds_nothing():
    assert np.array_equal(IdIndex(0).find(np.array([0, 5], np.int64)), [-1, -1])
    assert IdIndex(10).find(np.array([], np.int64)).shape == (0,)
