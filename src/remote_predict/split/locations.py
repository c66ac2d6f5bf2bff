"""Where a split reads from and writes to: local paths, or `s3://bucket/prefix` in object storage.

A split written to the store is staged locally one version directory at a time, uploaded with its
`saved_model.pb` last (so a polling server never takes a half-uploaded version for complete) and deleted
locally: the splitter's disk holds about one shard. The files that deploy the split (model configs,
split.json, kubernetes/) are local: `--deploy_dir`, which defaults to --output_dir when that is local.
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
        self.written_bytes: dict[str, int] = {}  # base path -> bytes of the version written there this run

    def base_path(self, *parts: str) -> str:
        """The path servers read a model from: an s3:// URI, or an absolute local directory."""
        if self.remote:
            return "/".join([self.root, *parts])
        return os.path.join(self.root, *parts)

    def version_dir(self, version: int, *parts: str) -> str:
        """A local directory to write `<base>/<version>` into; refuses a version the store already has."""
        if self.remote:
            location = s3_store.parse(self.base_path(*parts, str(version)))
            try:
                existing = self._store.list_objects(location)
            except ServingError as e:
                raise SystemExit(f"remote-predict split: {e.message}") from None
            if existing:
                raise SystemExit(f"{location.uri} exists already; pick another --version or remove it")
            return os.path.join(self._staging, *parts, str(version))
        return os.path.join(self.root, *parts, str(version))

    def publish(self, version: int, *parts: str) -> None:
        """The version directory is complete: record its size, and upload it (then drop the local copy)."""
        local = self.version_dir_path(version, *parts)
        self.written_bytes[self.base_path(*parts)] = directory_bytes(local)
        if not self.remote:
            return
        uri = self.base_path(*parts, str(version))
        try:
            uploaded = self._store.upload_directory(local, s3_store.parse(uri))
        except ServingError as e:
            raise SystemExit(f"remote-predict split: {e.message}") from None
        print(f"  uploaded {uri} ({uploaded / (1 << 20):.1f} MiB)", file=sys.stderr)
        shutil.rmtree(local, ignore_errors=True)

    def written(self, *parts: str) -> int | None:
        """Bytes of the version this run wrote under `parts` (None: it wrote none there)."""
        return self.written_bytes.get(self.base_path(*parts))

    def version_dir_path(self, version: int, *parts: str) -> str:
        base = self._staging if self.remote else self.root
        return os.path.join(base, *parts, str(version))

    def close(self) -> None:
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)


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
