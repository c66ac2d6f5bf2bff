"""Model versions in an S3 bucket (`s3://bucket/prefix`), through boto3, the AWS SDK.

Why boto3: it is the reference S3 client, kept by AWS, and it reads credentials the way every AWS tool
does (the environment, `~/.aws/credentials` and `~/.aws/config`, web identity tokens as on EKS,
container and instance roles), and the endpoint from `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`. Its
transfer manager copies the objects of a version in parallel. TF Serving's own variables are honoured
too: `S3_ENDPOINT` (host[:port], as TensorFlow's S3 file system takes it), `S3_USE_HTTPS`, `S3_VERIFY_SSL`.

Layout as in a local base path: `<prefix>/<integer version>/saved_model.pb` and the rest of the SavedModel
under the same `<prefix>/<version>/`. S3 has no directories and no atomic rename, so a version is a set
of objects that grows while it is uploaded; deciding when it is complete is the manager's (`load_plan`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from remote_predict.errors import Code, ServingError

SCHEME = "s3://"
MARKERS = ("saved_model.pb", "saved_model.pbtxt")  # a version is complete only once one of these is there
_CONNECT_TIMEOUT_SECONDS = 5  # an unreachable store is reported in seconds, not after the SDK's 60 s
_READ_TIMEOUT_SECONDS = 60
_TRANSFER_THREADS = 8


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the version's prefix: "saved_model.pb", "variables/variables.index", ...
    size: int
    etag: str


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # without leading or trailing "/"; "" for the bucket's root

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def child(self, relative: str) -> Location:
        return Location(self.bucket, self.key(relative.strip("/")))


def is_s3(path: str) -> bool:
    return path.lower().startswith(SCHEME)


def parse(uri: str) -> Location:
    """`s3://bucket/prefix/...` -> Location; a clear error for anything else."""
    if not is_s3(uri):
        raise ServingError(Code.INVALID_ARGUMENT, f"{uri} is not an s3:// URI")
    bucket, _, prefix = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise ServingError(Code.INVALID_ARGUMENT, f"{uri} names no bucket (s3://BUCKET/PREFIX)")
    return Location(bucket, prefix.strip("/"))


def endpoint_from_environment(environ: dict[str, str] | os._Environ = os.environ) -> tuple[str | None, bool]:
    """The endpoint URL to pass to boto3 (None: boto3's own choice), and whether to verify TLS.

    boto3 itself reads AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL; TF Serving's S3_ENDPOINT is a host[:port]
    whose scheme comes from S3_USE_HTTPS (default on). AWS's names win when both are set.
    """
    verify = environ.get("S3_VERIFY_SSL", "1").strip().lower() not in ("0", "false")
    if environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"):
        return None, verify
    endpoint = environ.get("S3_ENDPOINT", "").strip()
    if not endpoint:
        return None, verify
    if "://" not in endpoint:
        https = environ.get("S3_USE_HTTPS", "1").strip().lower() not in ("0", "false")
        endpoint = ("https://" if https else "http://") + endpoint
    return endpoint, verify


def error_from_sdk(e: Exception, what: str) -> ServingError:
    """A botocore exception as a ServingError whose code says what kind of trouble it is."""
    from botocore import exceptions

    if isinstance(e, exceptions.ClientError):
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = f"{what}: {code}: {error.get('Message') or e}"
        if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
            return ServingError(Code.NOT_FOUND, message)
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken"):
            return ServingError(Code.PERMISSION_DENIED, message)
        return ServingError(Code.UNAVAILABLE, message)
    if isinstance(e, exceptions.NoCredentialsError | exceptions.PartialCredentialsError):
        return ServingError(Code.FAILED_PRECONDITION, f"{what}: {e} (set AWS_ACCESS_KEY_ID and "
                                                      "AWS_SECRET_ACCESS_KEY, or a profile or role)")
    if isinstance(e, exceptions.BotoCoreError):  # connection refused, timeouts, DNS: the store is unreachable
        return ServingError(Code.UNAVAILABLE, f"{what}: the store is unreachable: {e}")
    return ServingError(Code.UNAVAILABLE, f"{what}: {type(e).__name__}: {e}")


class S3Store:
    """One S3 client for the process (boto3 clients are thread-safe), created on first use."""

    def __init__(self) -> None:
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                endpoint, verify = endpoint_from_environment()
                custom = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                config = Config(
                    connect_timeout=_CONNECT_TIMEOUT_SECONDS, read_timeout=_READ_TIMEOUT_SECONDS,
                    retries={"mode": "standard", "max_attempts": 3}, max_pool_connections=2 * _TRANSFER_THREADS,
                    # Stores other than AWS (MinIO, SeaweedFS, Ceph) are addressed by path, not by bucket host name.
                    s3={"addressing_style": "path"} if custom else None)
                self._client = boto3.session.Session().client("s3", endpoint_url=endpoint, verify=verify,
                                                              config=config)
            return self._client

    def list_objects(self, location: Location) -> list[tuple[str, int, str]]:
        """(key relative to the location, size, etag) of every object under it; raises ServingError."""
        client = self.client()
        prefix = f"{location.prefix}/" if location.prefix else ""
        found = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"][len(prefix):]
                    if key and not key.endswith("/"):  # "folder" marker objects some tools create
                        found.append((key, int(item["Size"]), str(item.get("ETag", ""))))
        except Exception as e:
            raise error_from_sdk(e, f"Cannot list {location.uri}") from None
        return found

    def list_versions(self, base: Location) -> dict[int, tuple[StoredObject, ...]]:
        """Version -> its objects, for every `<base>/<integer>/...` object; NOT_FOUND when nothing is there."""
        versions: dict[int, list[StoredObject]] = {}
        objects = self.list_objects(base)
        for key, size, etag in objects:
            head, _, rest = key.partition("/")
            if not head.isdigit() or not rest or int(head) >= (1 << 63):
                continue
            versions.setdefault(int(head), []).append(StoredObject(rest, size, etag))
        if not objects:
            raise ServingError(Code.NOT_FOUND, f"Could not find base path {base.uri} (no objects under it)")
        return {v: tuple(sorted(found, key=lambda o: o.key)) for v, found in versions.items()}

    def download(self, location: Location, objects: Iterable[StoredObject], directory: str) -> None:
        """Copy the listed objects of `location` into `directory`, in parallel; each must keep its listed size."""
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        objects = list(objects)
        config = TransferConfig(max_concurrency=_TRANSFER_THREADS, use_threads=True)
        futures = []
        try:
            with create_transfer_manager(self.client(), config) as manager:
                for item in objects:
                    target = _local_path(directory, item.key)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    futures.append(manager.download(location.bucket, location.key(item.key), target))
                for future in futures:
                    future.result()
        except ServingError:
            raise
        except Exception as e:
            raise error_from_sdk(e, f"Cannot copy {location.uri}") from None
        for item in objects:
            size = os.path.getsize(_local_path(directory, item.key))
            if size != item.size:
                raise ServingError(Code.UNAVAILABLE, f"{location.uri}/{item.key} changed while it was copied "
                                                     f"({item.size} bytes listed, {size} read)")

    def upload_directory(self, directory: str, location: Location) -> int:
        """Upload a local SavedModel directory; saved_model.pb goes last, so no poller sees it complete early.

        Returns the bytes uploaded. Refuses to write over a version that is already in the store.
        """
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        if self.list_objects(location):
            raise ServingError(Code.ALREADY_EXISTS, f"{location.uri} exists already; pick another --version "
                                                    "or remove it")
        files = []
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                files.append((os.path.relpath(path, directory).replace(os.sep, "/"), path))
        last = [f for f in files if f[0] in MARKERS]
        first = [f for f in files if f[0] not in MARKERS]
        config = TransferConfig(max_concurrency=_TRANSFER_THREADS, use_threads=True)
        try:
            with create_transfer_manager(self.client(), config) as manager:
                for batch in (first, last):
                    futures = [manager.upload(path, location.bucket, location.key(key)) for key, path in batch]
                    for future in futures:
                        future.result()
        except Exception as e:
            raise error_from_sdk(e, f"Cannot upload to {location.uri}") from None
        return sum(os.path.getsize(path) for _, path in files)


def _local_path(directory: str, key: str) -> str:
    """Where an object goes in the copy; a key that would leave the directory is refused."""
    target = os.path.normpath(os.path.join(directory, *key.split("/")))
    if not target.startswith(os.path.normpath(directory) + os.sep):
        raise ServingError(Code.INVALID_ARGUMENT, f"object key {key!r} leaves its version directory")
    return target
