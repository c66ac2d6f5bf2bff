"""Where a split reads from and writes to: local paths, or `s3://bucket/prefix` in object storage.

A split writes several version directories (every shard's, the master's, the unsplit model's). Written in
place, a failure half way (an error in the master, Ctrl-C, a full disk) would leave shards without their
master, and running the same command again would stop at the first directory that exists. So:

* Before any work, `taken` says which of the directories a run would write exist already (locally or in
  the store), so a re-run is told what to do (`refusal`) instead of failing after minutes of writing.
* Locally, each version directory is written under OUTPUT/.split-<random>/ (the same file system, so a
  move is a rename) and moved into place by `commit`, all of them together, shards first: a polling
  server never sees a master whose shards are missing, and a failure leaves nothing behind.
* In the store, each version directory is staged locally, uploaded as soon as it is written (`publish`)
  with its `saved_model.pb` last (so a polling server never takes a half-uploaded version for complete),
  and deleted locally: the splitter's disk holds about one shard. S3 has no rename: a split that fails
  after uploading its shards leaves them, and the re-run is told to write `--only=master`.

The files that deploy the split (model configs, split.json, kubernetes/) are local: `--deploy_dir`, which
defaults to --output_dir when that is local.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from remote_predict.errors import ServingError
from remote_predict.serving import s3_store, storage


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


class Output:
    def __init__(self, output_dir: str, deploy_dir: str = ""):
        storage.check_path(output_dir)
        self.remote = s3_store.is_s3(output_dir)
        if self.remote and not deploy_dir:
            raise SystemExit("--output_dir is in the store: give --deploy_dir, a local directory for the model "
                             "configs, split.json and the Kubernetes manifests")
        self.root = output_dir.rstrip("/") if self.remote else os.path.abspath(output_dir)
        self.deploy_dir = os.path.abspath(deploy_dir or output_dir)
        self._store = s3_store.S3Store() if self.remote else None
        self._staging = tempfile.mkdtemp(prefix="remote-predict-split-") if self.remote else ""
        self._root_scratch: str | None = None  # local outputs: OUTPUT/.split-*/, made on first use
        self._pending: list[tuple[str, str]] = []  # local outputs: (scratch, final), to move at commit
        self.written_bytes: dict[str, int] = {}  # base path -> bytes of the version written there this run

    def base_path(self, *parts: str) -> str:
        """The path servers read a model from: an s3:// URI, or an absolute local directory."""
        if self.remote:
            return "/".join([self.root, *parts])
        return os.path.join(self.root, *parts)

    def taken(self, version: int, pieces: list[tuple[str, ...]]) -> list[str]:
        """The version directories among `pieces` (each the parts of a base path) that exist already."""
        found = []
        for parts in pieces:
            if self.remote:
                location = s3_store.parse(self.base_path(*parts, str(version)))
                try:
                    if self._store.list_objects(location):
                        found.append(location.uri)
                except ServingError as e:
                    raise SystemExit(f"remote-predict split: {e.message}") from None
            elif os.path.lexists(os.path.join(self.root, *parts, str(version))):
                found.append(os.path.join(self.root, *parts, str(version)))
        return found

    def refusal(self, existing: list[str], version: int, only_master: bool = False) -> str:
        """What to say when a run would overwrite version directories (`only_master`: all but the master's
        exist, as after a run that stopped while waiting for its shards, or failed after uploading them)."""
        listed = ", ".join(e.removeprefix(self.root).lstrip("/") for e in existing)
        text = (f"version {version} is already in {self.root} ({listed}); pick another --version, or remove "
                f"{'it' if len(existing) == 1 else 'them'} to write it again")
        if only_master:
            text += "; to write only the master of this version, run with --only=master"
        return text

    def version_dir(self, version: int, *parts: str) -> str:
        """A local directory to write `<base>/<version>` into (a scratch one: `publish`, then `commit`)."""
        if self.remote:
            return os.path.join(self._staging, *parts, str(version))
        if self._root_scratch is None:
            os.makedirs(self.root, exist_ok=True)
            self._root_scratch = tempfile.mkdtemp(prefix=".split-", dir=self.root)
        scratch = os.path.join(self._root_scratch, *parts, str(version))
        os.makedirs(os.path.dirname(scratch), exist_ok=True)
        return scratch

    def publish(self, version: int, *parts: str) -> None:
        """The version directory is complete: record its size; upload it to the store (then drop the local
        copy), or keep it to move into place at `commit`."""
        local = self.version_dir_path(version, *parts)
        self.written_bytes[self.base_path(*parts)] = directory_bytes(local)
        if not self.remote:
            self._pending.append((local, os.path.join(self.root, *parts, str(version))))
            return
        uri = self.base_path(*parts, str(version))
        try:
            uploaded = self._store.upload_directory(local, s3_store.parse(uri))
        except ServingError as e:
            raise SystemExit(f"remote-predict split: {e.message}") from None
        print(f"  uploaded {uri} ({uploaded / (1 << 20):.1f} MiB)", file=sys.stderr)
        shutil.rmtree(local, ignore_errors=True)

    def commit(self) -> None:
        """Move every local version directory published since the last commit into place, in order; all or
        none (in the store they are in place as soon as they are uploaded)."""
        pending, self._pending = self._pending, []
        existing = [final for _, final in pending if os.path.lexists(final)]
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

    def written(self, *parts: str) -> int | None:
        """Bytes of the version this run wrote under `parts` (None: it wrote none there)."""
        return self.written_bytes.get(self.base_path(*parts))

    def version_dir_path(self, version: int, *parts: str) -> str:
        base = self._staging if self.remote else self._root_scratch
        return os.path.join(base, *parts, str(version))

    def close(self) -> None:
        """Drop what was written and not committed (a failed run leaves nothing behind locally)."""
        for scratch in (self._staging, self._root_scratch):
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        self._staging = self._root_scratch = None
        self._pending = []


def local_input(path: str, scratch: str) -> str:
    """A local path for the model to split: `path` itself, or its copy from the store under `scratch`.

    An s3:// `.keras` object is copied as one file; a prefix is a SavedModel or a base path of versions,
    of which only the highest version is copied (as the splitter would read only that one).
    """
    if not s3_store.is_s3(path):
        return path
    store = s3_store.S3Store()
    location = s3_store.parse(path)
    try:
        if location.prefix.endswith(".keras"):
            parent, _, name = location.prefix.rpartition("/")
            objects = [o for o in store.list_objects(s3_store.Location(location.bucket, parent)) if o[0] == name]
            if not objects:
                raise SystemExit(f"remote-predict split: cannot read {path}: no such object")
            store.download(s3_store.Location(location.bucket, parent),
                           [s3_store.StoredObject(name, objects[0][1], objects[0][2])], scratch)
            return os.path.join(scratch, name)
        objects = [s3_store.StoredObject(k, size, etag) for k, size, etag in store.list_objects(location)]
        if not objects:
            raise SystemExit(f"remote-predict split: cannot read {path}: no objects under it")
        versions = {o.key.split("/", 1)[0] for o in objects if "/" in o.key and o.key.split("/", 1)[0].isdigit()}
        if versions and not any(o.key in s3_store.MARKERS for o in objects):
            newest = max(versions, key=int)
            objects = [o for o in objects if o.key.startswith(f"{newest}/")]
            print(f"  reading version {newest} of {path}", file=sys.stderr)
        # Named as in the store: the model's name comes from its directory's.
        target = os.path.join(scratch, location.prefix.rpartition("/")[2] or location.bucket)
        store.download(location, objects, target)
    except ServingError as e:
        raise SystemExit(f"remote-predict split: cannot read {path}: {e.message}") from None
    return target
