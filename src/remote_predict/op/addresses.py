"""Target addresses: the one parser for every form a RemotePredict target may take.

| written as                                         | transport                          |
| -------------------------------------------------- | ---------------------------------- |
| `host:port`, `dns:///host:port`, `ipv4:h1:p1,h2:p2`, `ipv6:[::1]:p`, `unix:/path` | gRPC (TF Serving's API) |
| `tcp://host:port[,host:port...]`                   | remote-predict's framed TCP        |
| `http://host:port`, `https://host:port`            | TF Serving's REST API              |
| `inprocess`, `inprocess:PORT`                      | a server in this process           |
| `scheme://...` with a registered stub              | that stub                          |

The allowed-targets check, the loopback shortcut, the splitter's launch scripts and the transports all
read addresses through `parse`, so they cannot disagree about what a target names.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

GRPC, TCP, REST, INPROCESS, CUSTOM = "grpc", "tcp", "rest", "inprocess", "custom"
_GRPC_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6")
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", "ip6-localhost"})


@dataclass(frozen=True)
class Target:
    text: str  # as written
    kind: str  # GRPC, TCP, REST, INPROCESS or CUSTOM
    scheme: str  # the URL scheme ("" for plain gRPC names)
    endpoints: tuple[str, ...]  # "host:port" (host lower-cased, IPv6 in brackets) or a socket path

    @property
    def is_multi(self) -> bool:
        return len(self.endpoints) > 1


def split_host_port(endpoint: str) -> tuple[str, int | None]:
    """("host", port) of "host:port" or "[v6]:port"; the port is None when absent or not a number."""
    endpoint = endpoint.strip()
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
    return host.lower(), int(port) if port.isdigit() else None


def _endpoint(text: str) -> str:
    host, port = split_host_port(text)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port is not None else host


def _list(text: str) -> tuple[str, ...]:
    return tuple(_endpoint(part) for part in text.split(",") if part.strip())


def parse(target: str) -> Target:
    """What `target` names. Raises ValueError for an empty target."""
    text = target.strip()
    if not text:
        raise ValueError("a target address must not be empty")
    lowered = text.lower()
    if lowered == "inprocess" or lowered.startswith("inprocess:"):
        return Target(text, INPROCESS, "inprocess", ())
    if "://" in text:
        scheme, rest = lowered.split("://", 1)[0], text.split("://", 1)[1]
        if scheme in ("http", "https"):
            parts = urlsplit(text)
            port = parts.port or (443 if scheme == "https" else 80)
            return Target(text, REST, scheme, (_endpoint(f"{parts.hostname or ''}:{port}"),))
        if scheme == TCP:
            return Target(text, TCP, scheme, _list(rest.strip("/")))
        if scheme == "dns":  # dns://[authority]/host:port
            return Target(text, GRPC, scheme, _list(rest.split("/", 1)[1] if "/" in rest else ""))
        if scheme in ("unix", "unix-abstract"):
            return Target(text, GRPC, scheme, (lowered,))
        return Target(text, CUSTOM, scheme, (lowered,))
    scheme, _, rest = lowered.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return Target(text, GRPC, scheme, (lowered,))
    if scheme in ("ipv4", "ipv6"):
        return Target(text, GRPC, scheme, _list(text.split(":", 1)[1]))
    if scheme == "dns" and rest:
        return Target(text, GRPC, "dns", _list(text.split(":", 1)[1]))
    return Target(text, GRPC, "", (_endpoint(text),))


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")
