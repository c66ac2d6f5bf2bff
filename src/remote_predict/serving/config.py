"""Reading TF Serving's text-format config files: model config, batching, monitoring, SSL."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import message as proto_message
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from remote_predict.errors import Code, ServingError, invalid_argument

ModelConfig = model_server_config_pb2.ModelConfig
ModelServerConfig = model_server_config_pb2.ModelServerConfig
M = TypeVar("M", bound=proto_message.Message)


def parse_error_text(error: text_format.ParseError, message: proto_message.Message) -> str:
    """TF Serving's wording (protobuf's C++ parser's): `Error parsing text-format <type>: <line>:<column>: ...`.

    Scripts and tests written for TF Serving look for that phrase, so it is kept word for word.
    """
    detail = str(error)
    line, column = error.GetLine(), error.GetColumn()
    if line is not None:
        where = f"{line}:{column}" if column is not None else f"{line}"
        detail = detail.removeprefix(f"{where} : ")
        return f"Error parsing text-format {message.DESCRIPTOR.full_name}: {where}: {detail}"
    return f"Error parsing text-format {message.DESCRIPTOR.full_name}: {detail}"


def parse_text_proto(text: str, message: M, source: str) -> M:
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise invalid_argument(f"Invalid protobuf file: '{source}': {parse_error_text(e, message)}") from None


def read_text_proto(path: str, message: M) -> M:
    """Parse a text-format proto file; errors name the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ServingError(Code.NOT_FOUND, f"Cannot read '{path}': {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise invalid_argument(f"Invalid protobuf file: '{path}': not UTF-8 text") from None
    return parse_text_proto(text, message, path)


def single_model_config(name: str, base_path: str) -> ModelServerConfig:
    config = ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = base_path
    model.model_platform = "tensorflow"
    return config


def read_model_server_config(path: str) -> ModelServerConfig:
    return read_text_proto(path, ModelServerConfig())


def model_configs(config: ModelServerConfig, source: str = "model config") -> list[ModelConfig]:
    """The models of a ModelServerConfig, validated as TF Serving would before serving them."""
    kind = config.WhichOneof("config")
    if kind == "custom_model_config":
        raise invalid_argument(f"{source}: custom_model_config is not supported; use model_config_list")
    models = list(config.model_config_list.config)
    names: set[str] = set()
    for model in models:
        where = f"{source}: model '{model.name}'"
        if not model.name:
            raise invalid_argument(f"{source}: a model config has no name")
        if model.name in names:
            raise invalid_argument(f"{source}: model name '{model.name}' is configured twice")
        names.add(model.name)
        if not model.base_path:
            raise invalid_argument(f"{where} has no base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise invalid_argument(f"{where}: model_platform '{model.model_platform}' is not supported "
                                   "(only 'tensorflow')")
        if model.HasField("logging_config"):
            raise invalid_argument(f"{where}: logging_config (request logging) is not supported yet")
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise invalid_argument(f"{where}: model_version_policy specific {{}} lists no versions")
    return models
