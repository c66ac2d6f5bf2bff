"""A hot-row cache in the master (`--remote_predict_cache_mib`): the rows asked for most, kept in memory.

Ids in recommender traffic are skewed (click logs follow a Zipf law), so a small share of each table
serves a large share of lookups; HugeCTR's HPS keeps such a cache in front of its tiers for the same
reason. Rows come back from the shards exactly as stored, so a cached row is the row, bit for bit.

* **Versions.** A cache belongs to one table of one model version (the shards' version the master
  calls), so a roll-out never mixes versions: master N+1 starts with caches of its own.
* **Admission favours frequent ids** (TinyLFU's idea): a count-min sketch estimates how often each id
  has been asked for (halved every `AGE_EVERY` additions, so old popularity fades); once a cache is full,
  a new row replaces the least frequent of a few sampled ones only if it is asked for more often.
* **One budget per server.** Every cache of a runtime shares the budget, in proportion to its table's
  size; caches not used for `IDLE_SECONDS` (an unloaded version's) are dropped, and the others grow
  into their room. The bytes held never exceed the budget, and they are all of them: the rows, each
  slot's id, the id index and the sketch (for 128-byte rows, the last three add 50-95 %).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from remote_predict.op import id_index

SKETCH_ROWS = 4
AGE_EVERY = 10  # halve the sketch after this many additions per counter column, on average
SAMPLES = 8  # victims compared per admission once full
IDLE_SECONDS = 30.0
_COUNTER = np.dtype(np.uint32)  # the sketch's counters
_ONE = _COUNTER.type(1)  # in the counters' own dtype: np.add.at takes its slow path for a Python 1 (20x)
_SLOT_ID = np.dtype(np.int64)  # the id each slot holds
_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
                        np.uint64)[:SKETCH_ROWS, None]


def _sketch_width(capacity: int) -> int:
    """Counters per sketch row: about twice as many as the ids the cache holds, a power of two."""
    return max(64, 1 << (max(1, 2 * capacity) - 1).bit_length())


def footprint(capacity: int, row_bytes: int) -> int:
    """Bytes a cache of `capacity` rows of `row_bytes` holds: rows, slots' ids, id index, sketch."""
    sketch = SKETCH_ROWS * _sketch_width(capacity) * _COUNTER.itemsize
    return capacity * (row_bytes + _SLOT_ID.itemsize) + id_index.footprint(capacity) + sketch


def capacity_within(budget: int, row_bytes: int) -> int:
    """The most rows whose cache's footprint fits in `budget` bytes."""
    low, high = 0, max(0, budget) // row_bytes + 1  # footprint(low) <= budget < footprint(high), or low == 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if footprint(middle, row_bytes) <= budget else (low, middle)
    return low


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class RowCache:
    """Rows of one table of one version: `take` what is cached, `admit` what the shards answered."""

    def __init__(self, dim: int, dtype: np.dtype, capacity: int):
        self.dim, self.dtype = dim, np.dtype(dtype)
        self.capacity = max(0, capacity)
        self.rows = np.empty((self.capacity, dim), self.dtype)
        self.ids = np.full(self.capacity, -1, _SLOT_ID)  # id held by each slot
        self.index = id_index.IdIndex(self.capacity)  # slot of each id held
        self._size_sketch()
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self.rng = np.random.default_rng(0)

    @property
    def nbytes(self) -> int:
        """Everything it holds (`footprint`)."""
        return self.rows.nbytes + self.ids.nbytes + self.index.nbytes + self.sketch.nbytes

    def _size_sketch(self) -> None:
        """Counters for about twice as many ids as the cache holds (a fresh sketch when that changes)."""
        width = _sketch_width(self.capacity)
        if getattr(self, "width", None) != width:
            self.width = width
            self.sketch = np.zeros((SKETCH_ROWS, width), _COUNTER)
            self._shift = np.uint64(64 - (width.bit_length() - 1))  # the top bits of a product: its best
            self._row_starts = (np.arange(SKETCH_ROWS) * width)[:, None]  # each row's cells in the flat sketch
            self.added = 0

    def _cells(self, ids: np.ndarray) -> np.ndarray:
        """Each id's counter in each row of the sketch, as positions in the flat sketch (rows x ids)."""
        return ((ids.astype(np.uint64) * _MULTIPLIERS) >> self._shift).astype(np.int64) + self._row_starts

    def _count(self, ids: np.ndarray) -> None:
        """Add one to each id's counters (and age the sketch when it is due)."""
        np.add.at(self.sketch.reshape(-1), self._cells(ids).reshape(-1), _ONE)
        self.added += len(ids)
        if self.added >= AGE_EVERY * self.width:
            self.sketch >>= 1
            self.added = 0

    def _frequency(self, ids: np.ndarray) -> np.ndarray:
        return self.sketch.reshape(-1)[self._cells(ids)].min(axis=0)

    def take(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write the cached rows of `ids` (distinct) into `out`; returns the mask of ids that were cached.
        Every id asked for counts towards its frequency."""
        with self.lock:
            self._count(ids)
            if not len(self.index):
                self.stats.misses += len(ids)
                return np.zeros(len(ids), bool)
            slots = self.index.find(ids)
            hit = slots >= 0
            if hit.any():
                out[hit] = self.rows[slots[hit]]
            found = int(hit.sum())
            self.stats.hits += found
            self.stats.misses += len(ids) - found
            return hit

    def admit(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Offer rows the shards answered (ids distinct, not cached): free slots first; once full, each
        replaces the least frequent of `SAMPLES` sampled rows if it is asked for more often than that one."""
        if not self.capacity or not len(ids):
            return
        with self.lock:
            new = self.index.find(ids) < 0  # (another lookup may have admitted some meanwhile)
            ids, rows = ids[new], rows[new]
            held = len(self.index)
            placed = min(self.capacity - held, len(ids))
            if placed:  # free slots first
                self._place(ids[:placed], rows[:placed], np.arange(held, held + placed))
            rest, rest_rows = ids[placed:], rows[placed:]
            if not len(rest):
                return
            candidates = self.rng.integers(0, self.capacity, (len(rest), SAMPLES))
            victim_freq = self._frequency(self.ids[candidates].reshape(-1)).reshape(candidates.shape)
            weakest = np.argmin(victim_freq, axis=1)
            victims = candidates[np.arange(len(rest)), weakest]
            wins = self._frequency(rest) > victim_freq[np.arange(len(rest)), weakest]
            _, first = np.unique(victims, return_index=True)  # one newcomer per victim slot
            keep = np.zeros(len(rest), bool)
            keep[first] = True
            wins &= keep
            self.index.remove(self.ids[victims[wins]])
            self.stats.evictions += int(wins.sum())
            self._place(rest[wins], rest_rows[wins], victims[wins])

    def _place(self, ids: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> None:
        self.ids[slots] = ids
        self.rows[slots] = rows
        self.index.insert(ids, slots)

    def resize(self, capacity: int) -> None:
        """Shrink (keeping the most frequent rows) or grow to `capacity` rows."""
        with self.lock:
            capacity = max(0, capacity)
            if capacity == self.capacity:
                return
            held, slots = self.index.items()
            if len(held) > capacity:
                order = np.argsort(-self._frequency(held).astype(np.int64), kind="stable")[:capacity]
                self.stats.evictions += len(held) - capacity
                held, slots = held[order], slots[order]
            rows = np.empty((capacity, self.dim), self.dtype)
            rows[:len(held)] = self.rows[slots]
            self.rows, self.capacity = rows, capacity
            self.ids = np.full(capacity, -1, _SLOT_ID)
            self.ids[:len(held)] = held
            self.index = id_index.IdIndex(capacity)
            self.index.insert(held, np.arange(len(held)))
            self._size_sketch()

    def held(self) -> np.ndarray:
        """The ids whose rows the cache holds, in no particular order."""
        with self.lock:
            return self.index.items()[0]


class RowCaches:
    """The caches of one runtime, within one byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = max(0, budget_bytes)
        self._caches: dict[tuple, RowCache] = {}
        self._weights: dict[tuple, int] = {}
        self._used: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._checked = 0.0

    def get(self, key: tuple, dim: int, dtype: np.dtype, table_bytes: int) -> RowCache | None:
        """The cache for `key` (table and version); None when the budget is 0."""
        if not self.budget:
            return None
        now = time.monotonic()
        cache = self._caches.get(key)
        if cache is not None and now - self._checked < 1.0:
            self._used[key] = now
            return cache
        with self._lock:
            self._used[key] = now
            if cache is None:
                cache = self._caches[key] = RowCache(dim, dtype, 0)
                self._weights[key] = table_bytes
            self._checked = now
            for idle in [k for k, used in self._used.items() if now - used > IDLE_SECONDS]:
                self._caches.pop(idle, None)
                self._weights.pop(idle, None)
                self._used.pop(idle, None)
            total = sum(self._weights.values())
            for k, c in self._caches.items():
                share = self.budget * self._weights[k] / total
                c.resize(capacity_within(int(share), c.dim * c.dtype.itemsize))
            return cache

    def items(self) -> list[tuple[tuple, RowCache]]:
        with self._lock:
            return list(self._caches.items())

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, c in self.items())
