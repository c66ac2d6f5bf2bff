"""Where each cached id is: a hash table from int64 ids to slots, searched for a whole array at once.

The hot-row cache looks up every distinct id of a request on every lookup. A Python dict costs about
0.5 us an id (a loop over `ids.tolist()`); this table answers a request's 100-200 ids in a few numpy
passes, whatever the cache's size, and changes in place (no copy of the table per admission, which a
sorted array would need).

Open addressing with linear probing, sized to at least twice the ids it may hold, so a search probes one
or two positions on average: one numpy pass looks at the first four positions of every id's run, and the
few ids whose run is longer are finished one by one (more passes of numpy over a handful of ids would cost
more). A removed id leaves a marker that keeps later ids of its probe run reachable; when the markers
fill a quarter of the table, it is rebuilt from the ids still held.
"""

from __future__ import annotations

import numpy as np

EMPTY = -1  # a position never used since the last rebuild: a search stops here
REMOVED = -2  # a position whose id was removed: a search goes on, an insert may reuse it
_WINDOW = np.arange(4)  # positions of a run searched for every id at once; the rare longer runs one by one
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads consecutive ids over the table
_KEY, _SLOT = np.dtype(np.int64), np.dtype(np.int32)
POSITION_BYTES = _KEY.itemsize + _SLOT.itemsize


def _bits(capacity: int) -> int:
    """log2 of the table's positions: at least twice the ids it may hold, at least 64."""
    return max(6, (2 * max(0, capacity) - 1).bit_length())


def footprint(capacity: int) -> int:
    """Bytes an index for `capacity` ids holds."""
    return (1 << _bits(capacity)) * POSITION_BYTES


class IdIndex:
    """ids (>= 0, distinct) -> slots (< 2**31), for up to `capacity` ids at a time."""

    def __init__(self, capacity: int):
        self.capacity = max(0, capacity)
        bits = _bits(self.capacity)
        self._shift = np.uint64(64 - bits)
        self._mask = (1 << bits) - 1
        self.keys = np.full(1 << bits, EMPTY, _KEY)
        self.slots = np.zeros(1 << bits, _SLOT)
        self.size = 0
        self._removed = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.slots.nbytes

    def __len__(self) -> int:
        return self.size

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return ((ids.astype(np.uint64) * _GOLDEN) >> self._shift).astype(np.int64)

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """The table position of each id, -1 for an id not held."""
        home = self._home(ids)
        window = (home[:, None] + _WINDOW) & self._mask
        keys = self.keys[window]
        stop = (keys == ids[:, None]) | (keys == EMPTY)  # the id, or the end of its run
        first = stop.argmax(axis=1)
        rows = np.arange(len(ids))
        at = window[rows, first]
        found = np.where(keys[rows, first] == ids, at, -1)
        table = self.keys
        for i in np.flatnonzero(~stop[rows, first]).tolist():  # runs longer than the window (a few %)
            wanted, at = ids.item(i), (home.item(i) + len(_WINDOW)) & self._mask
            while (key := table.item(at)) != EMPTY:
                if key == wanted:
                    found[i] = at
                    break
                at = (at + 1) & self._mask
        return found

    def find(self, ids: np.ndarray) -> np.ndarray:
        """The slot of each id, -1 for an id not held."""
        positions = self._positions(ids)
        return np.where(positions >= 0, self.slots[positions], -1)

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Hold `ids` (distinct, none held yet) at `slots`."""
        if self.size + len(ids) > self.capacity:
            raise ValueError(f"an id index for {self.capacity} ids cannot hold {self.size + len(ids)}")
        if len(ids) and ids.min() < 0:
            raise ValueError("an id index holds ids >= 0 only")
        todo = np.arange(len(ids))
        position = self._home(ids)
        while len(todo):
            free = np.flatnonzero(self.keys[position] < 0)
            _, first = np.unique(position[free], return_index=True)  # one id per free position and pass
            taking = free[first]
            self.keys[position[taking]] = ids[todo[taking]]
            self.slots[position[taking]] = slots[todo[taking]]
            waiting = np.ones(len(todo), bool)
            waiting[taking] = False
            todo, position = todo[waiting], (position[waiting] + 1) & self._mask
        self.size += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Let go of `ids` (each held)."""
        positions = self._positions(ids)
        if (positions < 0).any():
            raise KeyError(f"ids not held: {ids[positions < 0][:5].tolist()}")
        self.keys[positions] = REMOVED
        self._removed += len(ids)
        self.size -= len(ids)
        if self._removed > len(self.keys) // 4:
            self._rebuild()

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of everything held, in table order."""
        held = self.keys >= 0
        return self.keys[held], self.slots[held]

    def _rebuild(self) -> None:
        ids, slots = self.items()
        self.keys.fill(EMPTY)
        self.size = self._removed = 0
        self.insert(ids, slots)
