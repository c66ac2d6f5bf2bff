"""How a table's rows are spread over shards: `mod` and `div`, as `tf.nn.embedding_lookup` defines them.

mod: row r goes to shard r % N, at local index r // N.
div: rows are cut into N contiguous ranges; the first V % N shards get one row more than the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("mod", "div")


@dataclass(frozen=True)
class Partition:
    strategy: str
    rows: int
    shards: int

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"partition strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.shards < 1 or self.rows < 1:
            raise ValueError("a partition needs at least one row and one shard")

    @property
    def _per_shard(self) -> int:
        return self.rows // self.shards

    @property
    def _extras(self) -> int:
        return self.rows % self.shards

    def shard_rows(self, shard: int) -> int:
        if self.strategy == "mod":
            return (self.rows - shard + self.shards - 1) // self.shards
        return self._per_shard + (1 if shard < self._extras else 0)

    def div_start(self, shard: int) -> int:
        return shard * self._per_shard + min(shard, self._extras)

    def assign(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, local index) of each id (int64 numpy arrays; ids already known to be in range)."""
        ids = np.asarray(ids, np.int64)
        if self.strategy == "mod":
            return ids % self.shards, ids // self.shards
        big = self._per_shard + 1
        edge = self._extras * big
        low = ids < edge
        shard = np.where(low, ids // big, self._extras + (ids - edge) // max(self._per_shard, 1))
        local = np.where(low, ids % big, (ids - edge) % max(self._per_shard, 1))
        return shard, local
