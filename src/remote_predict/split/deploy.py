"""What a split needs to run: a model config per server, a launch script and a Procfile."""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from remote_predict.op import addresses

GRPC_PORT_OFFSET = 1000  # a shard reached over tcp on port P serves gRPC on P + 1000 (launch.sh, Procfile)
HEALTH_WAIT_SECONDS = 900  # launch.sh says when every server answers, or after this long which do not
# On Ctrl-C or SIGTERM, launch.sh gives its servers their drain time (--drain_timeout_seconds, 30 s by
# default) and a margin, then kills whichever still runs and names it: stopping must never hang.
STOP_WAIT_SECONDS = 45


@dataclass
class Server:
    name: str  # "master", "shard_0", "base", ...
    models: dict[str, str]  # model name -> base path
    ports: list[int] = field(default_factory=list)  # gRPC port of each process (one per replica)
    rest_port: int = 0
    policy: str = ""  # a model_version_policy block, or "" for TF Serving's default (latest 1)
    remote_hosts: list[str] = field(default_factory=list)  # replicas on other machines, run there
    tcp_ports: list[int] = field(default_factory=list)  # --tcp_port of each process, when it has one
    held_bytes: int | None = None  # bytes of one version of its models (None: not known to this run)
    versions_kept: int = 1  # versions its policy keeps loaded


def shard_target(host: str, port: int) -> str:
    """The address a master calls a shard server at, when the server has a DNS name.

    Every such target in a split comes from here. `tcp://` resolves every address of the name (a headless
    Service: every ready pod) and re-resolves it every few seconds; each address is a replica with its
    own health (op/endpoints.py).
    """
    return f"tcp://{host}:{port}"


def replica_targets(target: str) -> list[str]:
    """One single-address target per replica `target` reaches now: its names resolved to each address."""
    parsed = addresses.parse(target)
    found: list[str] = []
    for endpoint in parsed.endpoints:
        host, port = addresses.split_host_port(endpoint)
        resolved = [endpoint]
        if port is not None and (parsed.kind == addresses.TCP or parsed.scheme == "dns"):
            try:
                infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
                resolved = [f"[{i[4][0]}]:{port}" if ":" in i[4][0] else f"{i[4][0]}:{port}" for i in infos]
            except OSError:
                pass  # not resolvable (yet): wait on the name itself
        for item in resolved:
            replica = f"tcp://{item}" if parsed.kind == addresses.TCP else item
            if replica not in found:
                found.append(replica)
    return found


def local_ports(address: str) -> tuple[list[int], list[str]]:
    """The loopback ports an address names (`host:port`, `dns:///h:p`, `ipv4:h1:p1,h2:p2`, `tcp://h:p,...`),
    and its endpoints on other hosts."""
    ports, others = [], []
    for endpoint in addresses.parse(address).endpoints:
        host, port = addresses.split_host_port(endpoint)
        if addresses.is_loopback(host) and port is not None:
            ports.append(port)
        else:
            others.append(endpoint)
    return ports, others


def shard_server(name: str, models: dict[str, str], address: str, policy: str, held_bytes: int | None = None,
                 versions_kept: int = 1) -> Server:
    """The server (its replicas on this machine) that `address`, the master's target for it, names."""
    ports, others = local_ports(address)
    tcp = addresses.parse(address).kind == addresses.TCP
    return Server(name, models, [p + GRPC_PORT_OFFSET for p in ports] if tcp else ports, policy=policy,
                  remote_hosts=others, tcp_ports=ports if tcp else [], held_bytes=held_bytes,
                  versions_kept=versions_kept)


def config_text(server: Server) -> str:
    blocks = []
    for name, path in server.models.items():
        policy = f"\n    model_version_policy {{ {server.policy} }}" if server.policy else ""
        blocks.append(f'  config {{\n    name: "{name}"\n    base_path: "{path}"\n    model_platform: "tensorflow"'
                      f"{policy}\n  }}")
    return "model_config_list {\n" + "\n".join(blocks) + "\n}\n"


def _command(server: Server, index: int, config: str) -> str:
    args = ["${REMOTE_PREDICT:-remote-predict}", "serve", "--host=127.0.0.1", f"--port={server.ports[index]}",
            f"--model_config_file={shlex.quote(config)}"]
    if server.tcp_ports:
        args.append(f"--tcp_port={server.tcp_ports[index]}")
    if server.rest_port and index == 0:
        args.append(f"--rest_api_port={server.rest_port}")
    return " ".join(args)


def write(output_dir: str, servers: Sequence[Server], scripts: bool = True) -> list[str]:
    """Write config/<server>.config, and launch.sh and Procfile unless `scripts` is False; returns the files."""
    config_dir = os.path.join(output_dir, "config")
    os.makedirs(config_dir, exist_ok=True)
    written, launch, procfile, checks = [], [], [], []
    for server in servers:
        path = os.path.join(config_dir, f"{server.name}.config")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config_text(server))
        written.append(path)
        for index, port in enumerate(server.ports):
            label = server.name if index == 0 else f"{server.name}_replica_{index}"
            command = _command(server, index, os.path.abspath(path))
            launch.append(f'echo "starting {label} on 127.0.0.1:{port}"\n{command} &\npids+=($!)')
            procfile.append(f"{label}: {command}")
            # What the callers use: a shard's tcp port (its HEALTH frame), otherwise the gRPC health service.
            health = f"tcp://127.0.0.1:{server.tcp_ports[index]}" if server.tcp_ports else f"grpc://127.0.0.1:{port}"
            checks.append(f"{label}={health}")
        for host in server.remote_hosts:
            launch.append(f"# {server.name} on {host}: run there with --model_config_file={os.path.abspath(path)}")
    if not scripts:  # the servers run elsewhere (Kubernetes): a script for this machine would mislead
        return written
    script = os.path.join(output_dir, "launch.sh")
    with open(script, "w", encoding="utf-8") as f:
        f.write("#!/usr/bin/env bash\n"
                "# Starts every server of this split on this machine (loopback only); Ctrl-C stops them all.\n"
                "# Set REMOTE_PREDICT to the remote-predict command if it is not on PATH.\n"
                "set -u\npids=()\n"
                "stop_all() {\n"
                "  trap - INT TERM\n"
                "  kill \"${pids[@]}\" 2>/dev/null\n"
                f"  local give_up=$((SECONDS + {STOP_WAIT_SECONDS}))\n"
                "  while [ -n \"$(jobs -pr)\" ] && [ \"$SECONDS\" -lt \"$give_up\" ]; do sleep 0.2; done\n"
                "  local left\n  left=$(jobs -pr)\n"
                "  if [ -n \"$left\" ]; then\n"
                f"    echo \"launch.sh: still running {STOP_WAIT_SECONDS}s after SIGTERM, killed:\" $left >&2\n"
                "    ps -o pid=,args= -p \"$(echo $left | tr ' ' ,)\" >&2\n"
                "    kill -KILL $left 2>/dev/null\n"
                "  fi\n"
                "  wait\n"
                "  exit 0\n"
                "}\n"
                "trap stop_all INT TERM\n"
                "trap 'kill \"${pids[@]}\" 2>/dev/null' EXIT\n"
                + "\n".join(launch)
                + f"\n${{REMOTE_PREDICT:-remote-predict}} health --wait={HEALTH_WAIT_SECONDS} {' '.join(checks)} &"
                  "\npids+=($!)\nwait\n")
    os.chmod(script, 0o755)
    procfile_path = os.path.join(output_dir, "Procfile")
    with open(procfile_path, "w", encoding="utf-8") as f:
        f.write("\n".join(procfile) + "\n")
    return [*written, script, procfile_path]
