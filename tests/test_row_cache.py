"""The master's hot-row cache (op/row_cache.py): exact rows, frequency-based admission, one budget."""

import numpy as np

from remote_predict.op import row_cache
from remote_predict.op.row_cache import RowCache, RowCaches

DIM = 4


def table_rows(ids: np.ndarray) -> np.ndarray:
    """What a shard would answer for `ids`: a row that says which id it is."""
    return np.repeat(ids.astype(np.float32)[:, None], DIM, axis=1) + np.arange(DIM, dtype=np.float32) / 10


def ask(cache: RowCache, ids) -> tuple[np.ndarray, np.ndarray]:
    """(rows, which came from the cache), filling the rest as a lookup does, then admitting them."""
    ids = np.unique(np.asarray(ids, np.int64))
    out = np.full((len(ids), DIM), np.nan, np.float32)
    hit = cache.take(ids, out)
    out[~hit] = table_rows(ids[~hit])
    cache.admit(ids[~hit], out[~hit])
    return out, hit


def test_cached_rows_are_the_rows_admitted_for_those_ids():
    cache = RowCache(DIM, np.float32, capacity=100)
    rng = np.random.default_rng(0)
    asked = 0
    for _ in range(50):
        ids = rng.integers(0, 300, 40)
        asked += len(np.unique(ids))
        rows, _ = ask(cache, ids)
        assert np.array_equal(rows, table_rows(np.unique(ids)))  # never another id's row
    assert len(cache.held()) == 100 and cache.nbytes == row_cache.footprint(100, DIM * 4)
    assert cache.stats.hits > 0 and cache.stats.hits + cache.stats.misses == asked


def test_frequent_ids_stay_and_rare_ones_do_not_push_them_out():
    cache = RowCache(DIM, np.float32, capacity=20)
    hot = np.arange(20)
    for _ in range(30):
        ask(cache, hot)
    rng = np.random.default_rng(1)
    for _ in range(30):  # a scan of ids seen once each
        ask(cache, rng.integers(1000, 100_000, 20))
    _, hit = ask(cache, hot)
    assert hit.mean() >= 0.9, "a one-off scan evicted the hot rows"


def test_zipf_traffic_is_mostly_answered_by_a_small_cache():
    rng = np.random.default_rng(2)
    rows = 100_000
    cache = RowCache(DIM, np.float32, capacity=rows // 20)  # 5 % of the table
    hits = asked = 0
    for step in range(400):
        ids = np.unique(np.minimum(rng.zipf(1.1, 176), rows) - 1)
        _, hit = ask(cache, ids)
        if step >= 100:
            hits, asked = hits + hit.sum(), asked + len(ids)
    assert hits / asked > 0.3, f"only {hits / asked:.0%} of distinct ids per request from a 5 % cache"


def test_resize_keeps_the_most_frequent_rows():
    cache = RowCache(DIM, np.float32, capacity=50)
    for repeat, ids in ((5, np.arange(10)), (1, np.arange(100, 140))):
        for _ in range(repeat):
            ask(cache, ids)
    cache.resize(10)
    assert sorted(cache.held()) == list(range(10)) and cache.nbytes == row_cache.footprint(10, DIM * 4)
    rows, hit = ask(cache, np.arange(10))
    assert hit.all() and np.array_equal(rows, table_rows(np.arange(10)))


def test_the_budget_counts_everything_a_cache_holds():
    for row_bytes in (4, 128, 4096):
        for budget in (0, 1_000, 65_536, 10_000_000):
            capacity = row_cache.capacity_within(budget, row_bytes)
            assert row_cache.footprint(capacity, row_bytes) <= budget or capacity == 0
            assert row_cache.footprint(capacity + 1, row_bytes) > budget
            cache = RowCache(row_bytes // 4, np.float32, capacity)
            assert cache.nbytes == row_cache.footprint(capacity, row_bytes)  # what it says is what it holds


def test_caches_share_one_budget_and_idle_ones_are_dropped(monkeypatch):
    budget = 64 * 1024
    caches = RowCaches(budget)
    small = caches.get(("m", 1, "items"), DIM, np.float32, table_bytes=1_000)
    big = caches.get(("m", 1, "users"), DIM, np.float32, table_bytes=3_000)
    caches._checked = 0  # rebalance now
    caches.get(("m", 1, "items"), DIM, np.float32, 1_000)
    for cache, share in ((small, budget // 4), (big, budget * 3 // 4)):  # shares in proportion to the tables
        assert cache.nbytes <= share < row_cache.footprint(cache.capacity + 1, DIM * 4)  # the most that fits
    assert small.nbytes + big.nbytes <= budget and big.capacity > 2 * small.capacity
    assert RowCaches(0).get(("m", 1, "items"), DIM, np.float32, 1_000) is None  # no budget, no cache
    clock = [1000.0]
    monkeypatch.setattr(row_cache.time, "monotonic", lambda: clock[0])
    caches._used = dict.fromkeys(caches._used, clock[0])
    clock[0] += row_cache.IDLE_SECONDS + 1
    caches._checked = 0
    new = caches.get(("m", 2, "users"), DIM, np.float32, 3_000)  # version 2 after a roll-out
    assert [key for key, _ in caches.items()] == [("m", 2, "users")]  # version 1's caches are gone
    assert new.nbytes <= budget < row_cache.footprint(new.capacity + 1, DIM * 4)  # all the budget is its own
