"""Where a split writes its version directories: a scratch directory in OUTPUT, moved into place at the end.

A split writes several version directories (every shard's, the master's, the unsplit model's). Written in
place, a failure half way (an error in the master, Ctrl-C, a full disk) would leave shards without their
master, and running the same command again would stop at the first directory that exists. So each is
written under OUTPUT/.split-<random>/ (the same file system, so a move is a rename), and moved into place
only when all of them are written, shards first: a polling server never sees a master whose shards are
missing. A failure leaves nothing behind. Before any work, `taken` says which of the directories a run
would write exist already, so a re-run is told what to do instead of failing after minutes of writing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence


def taken(paths: Sequence[str]) -> list[str]:
    """The directories among `paths` that exist already."""
    return [p for p in paths if os.path.lexists(p)]


def refusal(existing: Sequence[str], output_dir: str, version: int, only_master: bool = False) -> str:
    """What to say when a run would overwrite version directories (`only_master`: all but the master's
    exist, as after a run that stopped while waiting for its shards)."""
    listed = ", ".join(os.path.relpath(p, output_dir) for p in existing)
    text = (f"version {version} is already in {output_dir} ({listed}); pick another --version, or remove "
            f"{'it' if len(existing) == 1 else 'them'} to write it again")
    if only_master:
        text += "; to write only the master of this version, run with --only=master"
    return text


class Staging:
    """Version directories written aside and moved into place together (use with `with`: a failure, or a
    block left without `commit`, deletes what was written)."""

    def __init__(self, output_dir: str):
        self.output_dir = os.path.abspath(output_dir)
        self._root: str | None = None
        self._pending: list[tuple[str, str]] = []  # (scratch, final) in the order they were asked for

    def path(self, final: str) -> str:
        """Where to write the directory that becomes `final` (under OUTPUT) at the next `commit`."""
        if self._root is None:
            os.makedirs(self.output_dir, exist_ok=True)
            self._root = tempfile.mkdtemp(prefix=".split-", dir=self.output_dir)
        scratch = os.path.join(self._root, os.path.relpath(os.path.abspath(final), self.output_dir))
        os.makedirs(os.path.dirname(scratch), exist_ok=True)
        self._pending.append((scratch, os.path.abspath(final)))
        return scratch

    def commit(self) -> None:
        """Move every directory written since the last commit into place, in order; all or none."""
        pending, self._pending = self._pending, []
        existing = taken([final for _, final in pending])
        if existing:
            raise FileExistsError(f"{', '.join(existing)} appeared while the split was written")
        for _, final in pending:  # a file in the way fails here, before anything moves
            os.makedirs(os.path.dirname(final), exist_ok=True)
        done = []
        try:
            for scratch, final in pending:
                os.rename(scratch, final)
                done.append(final)
        except BaseException:
            for final in done:  # all or none: a shard without its master must not stay behind
                shutil.rmtree(final, ignore_errors=True)
            raise

    def discard(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        self._pending = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
