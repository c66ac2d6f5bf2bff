"""Carrying a canonical status code through TensorFlow's py-func error path.

TensorFlow turns any Python exception raised inside an EagerPyFunc into UNKNOWN (only ValueError,
TypeError, MemoryError, StopIteration and NotImplementedError map to other codes), so an op that must
fail with UNAVAILABLE or DEADLINE_EXCEEDED cannot say so with the exception type alone. The kernel
raises `RemotePredictError`, whose text embeds the code and message between markers; the server (and
`error_from_tf` for any caller) reads them back out of the TensorFlow error.
"""

from __future__ import annotations

import json
import re

import tensorflow as tf

from remote_predict.errors import Code, ServingError, code_from_int

_START = "<<remote_predict_status "
_END = " remote_predict_status>>"
_PATTERN = re.compile(re.escape(_START) + r"(\{.*?\})" + re.escape(_END), re.DOTALL)


class RemotePredictError(Exception):
    """Fails a RemotePredict op with a canonical code and message."""

    def __init__(self, code: int, message: str):
        self.code = code_from_int(code)
        self.message = message
        super().__init__(f"{_START}{json.dumps({'code': int(self.code), 'message': message})}{_END}")


def decode_status(text: str) -> tuple[Code, str] | None:
    """The (code, message) a RemotePredictError embedded in `text`, if any (the first, outermost one)."""
    match = _PATTERN.search(text)
    if match is None:
        return None
    try:
        payload = json.loads(match.group(1))
        return code_from_int(int(payload["code"])), str(payload["message"])
    except (ValueError, KeyError, TypeError):
        return None


_GRAPH_ERROR_PREFIX = "Graph execution error:"
_TRACEBACK_BLOCK = re.compile(
    r"Detected at node .*? defined at \(most recent call last\):.*?(?=\nNode: |\Z)", re.DOTALL
)


def clean_tf_message(message: str) -> str:
    """Drop the Python-side decorations TF adds to runtime errors; keep TF's own explanation."""
    message = message.strip()
    if message.startswith(_GRAPH_ERROR_PREFIX):
        message = message[len(_GRAPH_ERROR_PREFIX):].strip()
    message = _TRACEBACK_BLOCK.sub("", message).strip()
    return message


def error_from_tf(error: tf.errors.OpError) -> ServingError:
    """Translate a TF runtime error into a ServingError, recovering RemotePredict's own status."""
    status = decode_status(error.message)
    if status is not None:
        return ServingError(*status)
    return ServingError(code_from_int(error.error_code), clean_tf_message(error.message))
