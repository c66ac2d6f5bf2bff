"""Where versions are stored, behind the two questions the manager asks: which versions exist, and where
is a local directory holding one of them.

Base paths are local directories (TF Serving's layout, used in place) or `s3://bucket/prefix` (copied
into the model cache, see `model_cache`). `gs://` is refused with a clear message: point
`AWS_ENDPOINT_URL` at Cloud Storage's S3-compatible XML API instead (not tested here).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from remote_predict.errors import invalid_argument, not_found
from remote_predict.serving import s3_store, source
from remote_predict.serving.model_cache import ModelCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredVersion:
    """One version as storage lists it."""

    version: int
    path: str  # a local directory, or the version's s3:// URI
    fingerprint: object  # changes when the version's content changes, so a failed version gets a new try
    complete: bool = True  # its saved_model.pb is there (local directories: assumed, as TF Serving does)
    settles: bool = False  # True: new only once two listings agree (object stores cannot rename atomically)
    objects: tuple[s3_store.StoredObject, ...] = ()

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)


@dataclass
class LocalCopy:
    """A local directory holding a version; `release()` when the version is unloaded."""

    path: str
    cache: ModelCache | None = None

    def release(self) -> None:
        if self.cache is not None:
            self.cache.release(self.path)
            self.cache = None


def is_remote(path: str) -> bool:
    return "://" in path


def check_path(path: str) -> None:
    """Refuse a base path no store here can read, before anything is listed."""
    if is_remote(path) and not s3_store.is_s3(path):
        scheme = path.split("://", 1)[0]
        hint = (" (Cloud Storage: use its S3-compatible endpoint, AWS_ENDPOINT_URL=https://storage.googleapis.com "
                "with HMAC keys, and an s3:// path)") if scheme.lower() == "gs" else ""
        raise invalid_argument(f"base path {path}: {scheme}:// is not supported; use a local directory or "
                               f"s3://BUCKET/PREFIX{hint}")
    if s3_store.is_s3(path):
        s3_store.parse(path)


class Storage:
    """The process's stores: an S3 client (created on first use) and the model cache."""

    def __init__(self, cache_dir: str = "", cache_max_bytes: int = 0):
        self._cache_dir = cache_dir
        self._cache_max_bytes = cache_max_bytes
        self._cache: ModelCache | None = None
        self._lock = threading.Lock()
        self._s3 = s3_store.S3Store()

    def cache(self) -> ModelCache:
        """Created when the first stored version is copied: servers of local models make no cache directory."""
        with self._lock:
            if self._cache is None:
                self._cache = ModelCache(self._cache_dir, self._cache_max_bytes)
            return self._cache

    def list_versions(self, base_path: str) -> dict[int, StoredVersion]:
        """Version -> StoredVersion; raises ServingError (NOT_FOUND when the base path does not exist)."""
        check_path(base_path)
        if s3_store.is_s3(base_path):
            base = s3_store.parse(base_path)
            listed = self._s3.list_versions(base)
            return {v: StoredVersion(v, base.child(str(v)).uri, fingerprint=objects,
                                     complete=any(o.key in s3_store.MARKERS for o in objects), settles=True,
                                     objects=objects)
                    for v, objects in listed.items()}
        try:
            found = source.list_versions(base_path)
        except FileNotFoundError:
            raise not_found(f"Could not find base path {base_path}") from None
        except OSError as e:
            raise invalid_argument(f"Cannot read base path {base_path}: {e}") from None
        return {v: StoredVersion(v, path, fingerprint=source.fingerprint(path)) for v, path in found.items()}

    def fetch(self, stored: StoredVersion, label: str) -> LocalCopy:
        """A local directory holding `stored`: the directory itself, or a fresh copy in the cache."""
        if not s3_store.is_s3(stored.path):
            return LocalCopy(stored.path)
        cache = self.cache()
        path = cache.reserve(stored.size, label)
        started = time.monotonic()
        try:
            self._s3.download(s3_store.parse(stored.path), stored.objects, path)
        except BaseException:
            cache.release(path)
            raise
        log.info("Copied %s (%d objects, %d bytes) to %s in %.2fs", stored.path, len(stored.objects), stored.size,
                 path, time.monotonic() - started)
        return LocalCopy(path, cache)

    def close(self) -> None:
        with self._lock:
            if self._cache is not None:
                self._cache.close()
                self._cache = None

