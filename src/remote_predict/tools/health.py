"""`remote-predict health`: whether servers answer their health checks, or wait until they all do.

A split's launch.sh starts several servers at once; loading the shards' tables can take a while, and
each server logs on its own. This says, in one line, when every one of them answers: a gRPC target is
asked with the standard gRPC health service (what Kubernetes' gRPC probes ask), a tcp target with a
HEALTH frame on its --tcp_port (`remote_predict.frames`: what the master's lookups use).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from remote_predict import frames
from remote_predict.errors import Code

SCHEMES = ("grpc", "tcp")


@dataclass(frozen=True)
class Target:
    label: str
    scheme: str  # grpc or tcp
    address: str  # host:port

    def __str__(self) -> str:
        return f"{self.label} ({self.scheme}://{self.address})"


def parse_target(text: str) -> Target:
    """`[LABEL=][grpc://|tcp://]HOST:PORT` (no scheme: grpc); ValueError for anything else."""
    label, _, address = text.rpartition("=")
    scheme, _, rest = address.rpartition("://")
    scheme = scheme or "grpc"
    host, _, port = rest.rpartition(":")
    if scheme not in SCHEMES or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not [LABEL=][grpc://|tcp://]HOST:PORT")
    return Target(label or rest, scheme, rest)


def grpc_serving(address: str, timeout: float) -> bool:
    """Whether the gRPC health service at `address` says the server (service "") is SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout)
        return answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def tcp_serving(address: str, timeout: float) -> bool:
    """Whether a remote-predict --tcp_port at `address` answers a HEALTH frame with OK (SERVING)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            frames.send(sock, frames.encode(frames.HEALTH, 0, b"", b""))
            _, code, _, _ = frames.read(sock)
        return code == Code.OK
    except (OSError, EOFError, frames.FrameError):
        return False


def serving(target: Target, timeout: float) -> bool:
    return (tcp_serving if target.scheme == "tcp" else grpc_serving)(target.address, timeout)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="remote-predict health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", metavar="[LABEL=]ADDRESS",
                        help="grpc://HOST:PORT (or HOST:PORT) or tcp://HOST:PORT, optionally named LABEL=")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long until every target answers, then print one line "
                             "(default 0: check once and print each target's state)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds each check may take (default 2)")
    args = parser.parse_args(argv)
    try:
        targets = [parse_target(t) for t in args.targets]
    except ValueError as e:
        parser.error(str(e))
    if args.wait <= 0:
        states = {target: serving(target, args.timeout) for target in targets}
        for target, up in states.items():
            print(f"{target}: {'SERVING' if up else 'NOT SERVING'}")
        return 0 if all(states.values()) else 1
    deadline = time.monotonic() + args.wait
    waiting = list(targets)
    while True:
        waiting = [t for t in waiting if not serving(t, args.timeout)]
        if not waiting:
            print(f"all {len(targets)} servers answer their health checks: "
                  f"{', '.join(str(t) for t in targets)}", flush=True)
            return 0
        if time.monotonic() > deadline:
            print(f"after {args.wait:g}s, {len(waiting)} of {len(targets)} servers do not answer their health "
                  f"checks: {', '.join(str(t) for t in waiting)}", file=sys.stderr, flush=True)
            return 1
        time.sleep(0.5)
