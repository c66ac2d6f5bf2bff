"""Where a RemotePredict op may connect: `--remote_predict_allowed_targets` patterns.

A model file names its own target; without a limit, loading a model would let it make the server call
any address. Patterns are `host:port` shell-style globs (`localhost:*`, `10.0.0.*:8500`,
`unix:/run/*.sock`); a target is allowed only if every endpoint it could connect to matches one.
The check runs before any channel is created, so a refused target never sees a connection attempt.
"""

from __future__ import annotations

import fnmatch
import threading
from urllib.parse import urlsplit

from remote_predict.errors import Code, ServingError

_lock = threading.Lock()
_patterns: tuple[str, ...] = ()  # empty: every target is allowed (TF Serving's behaviour)


def set_allowed_targets(patterns: list[str] | tuple[str, ...]) -> None:
    global _patterns
    cleaned = tuple(p.strip().lower() for p in patterns if p.strip())
    with _lock:
        _patterns = cleaned


def allowed_targets() -> tuple[str, ...]:
    return _patterns


def _split_host_port(address: str) -> str:
    return address.strip().lower()


def endpoints(target: str) -> list[str]:
    """The `host:port` endpoints (or socket paths) a target address would connect to."""
    target = target.strip()
    lowered = target.lower()
    if lowered.startswith(("http://", "https://")):
        parts = urlsplit(target)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return [f"{(parts.hostname or '').lower()}:{port}"]
    if lowered.startswith("inprocess"):
        return []
    if lowered.startswith(("unix:", "unix-abstract:")):
        return [lowered]
    if lowered.startswith(("ipv4:", "ipv6:")):
        return [_split_host_port(a) for a in target.split(":", 1)[1].split(",") if a.strip()]
    if lowered.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
        return [_split_host_port(rest)]
    if "://" in target:
        return [lowered]
    return [_split_host_port(target)]


def check_allowed(target: str) -> None:
    """Raise PERMISSION_DENIED unless every endpoint of `target` matches an allowed pattern."""
    patterns = _patterns
    if not patterns:
        return
    for endpoint in endpoints(target):
        if not any(fnmatch.fnmatchcase(endpoint, p) for p in patterns):
            raise ServingError(
                Code.PERMISSION_DENIED,
                f"RemotePredict target {target!r} is not allowed by --remote_predict_allowed_targets "
                f"({','.join(patterns)})",
            )
