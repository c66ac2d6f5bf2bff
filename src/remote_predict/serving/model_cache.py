"""Local copies of versions kept in object storage: TensorFlow loads a SavedModel from local files.

Bounded in two ways: a copy lives only while its version is loading or loaded (it is deleted when the
version is unloaded or fails to load), and the copies together may not exceed `--model_cache_max_bytes`
(0: the free space of the disk is the limit). A copy that would not fit fails that version's load with
RESOURCE_EXHAUSTED, which the manager reports and retries like any failed load.

Each server process works in its own `run-*` directory under `--model_cache_dir`, locked while it lives,
so several servers may share one cache directory, and copies left by a killed process (a container
restarted in the same pod keeps its emptyDir) are removed by the next one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import threading

from remote_predict.errors import Code, ServingError

log = logging.getLogger(__name__)

DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "remote-predict-model-cache")
_LOCK_NAME = ".lock"
_DISK_HEADROOM_BYTES = 64 << 20  # never fill the disk to the last byte: logs and TF need some too


class ModelCache:
    def __init__(self, root: str = "", max_bytes: int = 0):
        self.root = os.path.abspath(root or DEFAULT_DIR)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}  # copy directory -> bytes
        os.makedirs(self.root, exist_ok=True)
        self._remove_abandoned()
        self.run_dir = tempfile.mkdtemp(prefix="run-", dir=self.root)
        self._lock_file = open(os.path.join(self.run_dir, _LOCK_NAME), "w")  # noqa: SIM115 - held until close()
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)

    def _remove_abandoned(self) -> None:
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if not name.startswith("run-") or not os.path.isdir(path):
                continue
            try:
                with open(os.path.join(path, _LOCK_NAME), "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its process lives
            except OSError:
                continue
            log.info("Removing model copies left by a stopped server: %s", path)
            shutil.rmtree(path, ignore_errors=True)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    def reserve(self, nbytes: int, label: str) -> str:
        """A new empty directory for a copy of `nbytes`; RESOURCE_EXHAUSTED when it would not fit."""
        with self._lock:
            used = sum(self._reserved.values())
            if self.max_bytes and used + nbytes > self.max_bytes:
                raise ServingError(Code.RESOURCE_EXHAUSTED, (
                    f"the model cache cannot hold {label} ({nbytes} bytes): {used} of --model_cache_max_bytes="
                    f"{self.max_bytes} are in use by loaded versions"))
            free = shutil.disk_usage(self.run_dir).free
            if nbytes + _DISK_HEADROOM_BYTES > free:
                raise ServingError(Code.RESOURCE_EXHAUSTED, (
                    f"the model cache cannot hold {label} ({nbytes} bytes): {free} bytes are free on the disk of "
                    f"{self.root}"))
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:80]
            path = tempfile.mkdtemp(prefix=f"{safe}-", dir=self.run_dir)
            self._reserved[path] = nbytes
            return path

    def release(self, path: str) -> None:
        """Delete a copy (its version was unloaded, or failed to load)."""
        with self._lock:
            self._reserved.pop(path, None)
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._reserved.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self._lock_file.close()
