"""The op's attributes, and how they travel inside the graph.

The graph node is an `EagerPyFunc` whose only configuration is its string attr `token`; we put the
RemotePredict attributes there as a versioned prefix plus canonical JSON. Decoding is strict: a token
from a model file is data, never code, and anything but exactly our schema is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tensorflow.core.framework import types_pb2

from remote_predict.op import tokens

TOKEN_PREFIX = tokens.REMOTE_PREDICT + ":"
DEFAULT_DEADLINE_MILLIS = 3000  # as TF Serving's Python wrappers
DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class OpConfig:
    target_address: str
    model_name: str
    output_types: tuple[int, ...]  # DataType enums of the outputs, in alias order
    model_version: int = -1
    max_rpc_deadline_millis: int = DEFAULT_DEADLINE_MILLIS
    signature_name: str = DEFAULT_SIGNATURE
    fail_op_on_rpc_error: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.target_address, str) or not self.target_address:
            raise ValueError("target_address must be a non-empty string")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError("model_name must be specified")
        for name in ("model_version", "max_rpc_deadline_millis"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_rpc_deadline_millis <= 0:
            raise ValueError(f"max_rpc_deadline_millis must be positive, got {self.max_rpc_deadline_millis}")
        if not isinstance(self.signature_name, str):
            raise ValueError("signature_name must be a string")
        if not isinstance(self.fail_op_on_rpc_error, bool):
            raise ValueError("fail_op_on_rpc_error must be a boolean")
        if not isinstance(self.output_types, tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t in types_pb2.DataType.values()
            and t != types_pb2.DT_INVALID
            for t in self.output_types
        ):
            raise ValueError(f"output_types must be a list of TensorFlow dtypes, got {self.output_types!r}")

    def to_token(self) -> str:
        return tokens.dump(tokens.REMOTE_PREDICT, asdict(self))

    @classmethod
    def from_token(cls, token: str) -> OpConfig:
        """Parse a token (bound or not); raises ValueError for anything that is not exactly our schema."""
        fields = tokens.load(token, tokens.REMOTE_PREDICT, cls.__dataclass_fields__, "RemotePredict")
        if not isinstance(fields["output_types"], list):
            raise ValueError("malformed RemotePredict token: output_types must be a list")
        fields["output_types"] = tuple(fields["output_types"])
        return cls(**fields)
