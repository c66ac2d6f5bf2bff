"""What a split needs to run: a model config per server, a launch script and a Procfile."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from remote_predict.op import addresses

GRPC_PORT_OFFSET = 1000  # a shard reached over tcp on port P serves gRPC on P + 1000 (launch.sh, Procfile)
HEALTH_WAIT_SECONDS = 900  # launch.sh says when every server answers, or after this long which do not


@dataclass
class Server:
    name: str  # "master", "shard_0", "base", ...
    models: dict[str, str]  # model name -> base path
    ports: list[int] = field(default_factory=list)  # gRPC port of each process (one per replica)
    rest_port: int = 0
    policy: str = ""  # a model_version_policy block, or "" for TF Serving's default (latest 1)
    remote_hosts: list[str] = field(default_factory=list)  # replicas on other machines, run there
    tcp_ports: list[int] = field(default_factory=list)  # --tcp_port of each process, when it has one


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


def shard_server(name: str, models: dict[str, str], address: str, policy: str) -> Server:
    """The server (its replicas on this machine) that `address`, the master's target for it, names."""
    ports, others = local_ports(address)
    if addresses.parse(address).kind == addresses.TCP:
        return Server(name, models, [p + GRPC_PORT_OFFSET for p in ports], policy=policy, remote_hosts=others,
                      tcp_ports=ports)
    return Server(name, models, ports, policy=policy, remote_hosts=others)


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


def write(output_dir: str, servers: Sequence[Server]) -> list[str]:
    """Write config/<server>.config, launch.sh and Procfile; returns the files written."""
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
    script = os.path.join(output_dir, "launch.sh")
    with open(script, "w", encoding="utf-8") as f:
        f.write("#!/usr/bin/env bash\n"
                "# Starts every server of this split on this machine (loopback only); Ctrl-C stops them all.\n"
                "# Set REMOTE_PREDICT to the remote-predict command if it is not on PATH.\n"
                "set -u\npids=()\ntrap 'kill \"${pids[@]}\" 2>/dev/null; wait' EXIT INT TERM\n"
                + "\n".join(launch)
                + f"\n${{REMOTE_PREDICT:-remote-predict}} health --wait={HEALTH_WAIT_SECONDS} {' '.join(checks)} &"
                  "\npids+=($!)\nwait\n")
    os.chmod(script, 0o755)
    procfile_path = os.path.join(output_dir, "Procfile")
    with open(procfile_path, "w", encoding="utf-8") as f:
        f.write("\n".join(procfile) + "\n")
    return [*written, script, procfile_path]
