"""Where a RemotePredict op may connect: `--remote_predict_allowed_targets` patterns.

A model file names its own target; without a limit, loading a model would let it make the server call
any address. Patterns are `host:port` shell-style globs (`localhost:*`, `10.0.0.*:8500`,
`unix:/run/*.sock`); a target is allowed only if every endpoint it could connect to matches one.
The check runs before any channel is created, so a refused target never sees a connection attempt.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from remote_predict.errors import Code, ServingError
from remote_predict.op import addresses


def patterns(text: Iterable[str]) -> tuple[str, ...]:
    """Normalized patterns (empty: every target is allowed, TF Serving's behaviour)."""
    return tuple(p.strip().lower() for p in text if p.strip())


def endpoints(target: str) -> list[str]:
    """The `host:port` endpoints (or socket paths) a target address would connect to."""
    return list(addresses.parse(target).endpoints)


def check_allowed(allowed: tuple[str, ...], target: str) -> None:
    """Raise PERMISSION_DENIED unless every endpoint of `target` matches an allowed pattern."""
    if not allowed:
        return
    for endpoint in endpoints(target):
        if not any(fnmatch.fnmatchcase(endpoint, p) for p in allowed):
            raise ServingError(
                Code.PERMISSION_DENIED,
                f"RemotePredict target {target!r} is not allowed by --remote_predict_allowed_targets "
                f"({','.join(allowed)})",
            )
