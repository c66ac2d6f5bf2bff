"""The `token` attribute of our EagerPyFunc nodes: which op, bound to which server, configured how.

    remote_predict.v1:{...json...}            a RemotePredict op, as exported
    remote_predict_lookup.v1:{...json...}     a sharded-table lookup (the splitter's masters)
    remote_predict.v1@7:{...json...}          the same op, bound to op runtime 7 when a server loaded it

Binding is why several servers in one process keep their own settings: a server rewrites the tokens of
every model it loads to name its own `OpRuntime`, so a node knows whose allowed targets, channels, TLS
and metrics to use even when TensorFlow runs it on a thread of its own. An unbound token (a model loaded
with `tf.saved_model.load`) uses the process's default runtime.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection

REMOTE_PREDICT = "remote_predict.v1"
LOOKUP = "remote_predict_lookup.v1"
KINDS = (REMOTE_PREDICT, LOOKUP)
MAX_TOKEN_BYTES = 64 * 1024
_PATTERN = re.compile(r"(remote_predict\.v1|remote_predict_lookup\.v1)(?:@([0-9]{1,9}))?:")


def split(token: str) -> tuple[str, int | None, str]:
    """(kind, runtime id or None, JSON payload); ValueError when `token` is not one of ours."""
    if not isinstance(token, str):
        raise ValueError("not a RemotePredict token")
    match = _PATTERN.match(token)
    if match is None:
        raise ValueError("not a RemotePredict token")
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError("RemotePredict token is too long")
    runtime = match.group(2)
    return match.group(1), int(runtime) if runtime is not None else None, token[match.end():]


def is_ours(token: str) -> bool:
    return isinstance(token, str) and _PATTERN.match(token) is not None


def make(kind: str, payload: str, runtime: int | None = None) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r}")
    return f"{kind}{'' if runtime is None else f'@{runtime}'}:{payload}"


def bind(token: str, runtime: int) -> str:
    """The same token, naming runtime `runtime` (replacing any earlier binding)."""
    kind, _, payload = split(token)
    return make(kind, payload, runtime)


def dump(kind: str, fields: dict) -> str:
    """An unbound token of `kind` holding `fields` as canonical JSON (sorted keys, no spaces)."""
    return make(kind, json.dumps(fields, sort_keys=True, separators=(",", ":")))


def load(token: str, kind: str, keys: Collection[str], what: str) -> dict:
    """The JSON fields of a token of `kind` (bound or not) that holds exactly `keys`; ValueError naming
    `what` ("RemotePredict", "lookup") for anything else. The values are the caller's to check."""
    found, _, payload = split(token)
    if found != kind:
        raise ValueError(f"not a {what} token")
    try:
        fields = json.loads(payload)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed {what} token: {e}") from None
    if not isinstance(fields, dict) or set(fields) != set(keys):
        raise ValueError(f"malformed {what} token: expected keys {sorted(keys)}")
    return fields
