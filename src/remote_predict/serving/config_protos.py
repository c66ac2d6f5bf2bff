"""TF Serving's config messages that `tensorflow-serving-api` does not ship, and remote-predict's own.

BatchingParameters (session_bundle_config.proto), MonitoringConfig (monitoring_config.proto) and
SSLConfig (ssl_config.proto) are built here from their public field names and numbers, so that the
same text-format files TF Serving reads parse here with the same protobuf text parser. TracingConfig
(`--tracing_config_file`) is ours, in the same text format; proto2, so that a field left out is told
apart from one set to zero.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "tensorflow.serving"

# (message, [(field, number, type, label, type_name)])
_MESSAGES = {
    "BatchingParameters": [
        ("max_batch_size", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, _F.TYPE_INT64, _F.LABEL_REPEATED, None),
        ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
        ("enable_large_batch_splitting", 8, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.BoolValue"),
        ("max_execution_batch_size", 9, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ],
    "PrometheusConfig": [
        ("enable", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
        ("path", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ],
    "MonitoringConfig": [
        ("prometheus_config", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".tensorflow.serving.PrometheusConfig"),
    ],
    "SSLConfig": [
        ("server_key", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("server_cert", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("custom_ca", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("client_verify", 4, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
    ],
}


_OWN_PACKAGE = "remote_predict"
_OWN_MESSAGES = {
    "TracingConfig": [
        ("otlp_endpoint", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("sampling_ratio", 2, _F.TYPE_DOUBLE, _F.LABEL_OPTIONAL, None),
        ("service_name", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ],
}


def add_file(pool, name: str, package: str, syntax: str, messages: dict, dependencies: list[str]) -> None:
    """Declare `messages` ({message: [(field, number, type, label, type_name or None)]}) as the file `name`
    of `package` in `pool`, which must already hold the `dependencies` (file names) they refer to."""
    file = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax=syntax, dependency=dependencies)
    for message_name, fields in messages.items():
        message = file.message_type.add(name=message_name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
    pool.Add(file)


def _build():
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    wrappers = [wrappers_pb2.DESCRIPTOR.name]
    add_file(pool, name="remote_predict/tf_serving_extra_config.proto", package=_PACKAGE, syntax="proto3",
             messages=_MESSAGES, dependencies=wrappers)
    add_file(pool, name="remote_predict/remote_predict_config.proto", package=_OWN_PACKAGE, syntax="proto2",
             messages=_OWN_MESSAGES, dependencies=wrappers)
    found = {name: f"{_PACKAGE}.{name}" for name in _MESSAGES}
    found.update({name: f"{_OWN_PACKAGE}.{name}" for name in _OWN_MESSAGES})
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(full)) for name, full in found.items()}


_CLASSES = _build()
BatchingParameters = _CLASSES["BatchingParameters"]
MonitoringConfig = _CLASSES["MonitoringConfig"]
PrometheusConfig = _CLASSES["PrometheusConfig"]
SSLConfig = _CLASSES["SSLConfig"]
TracingConfig = _CLASSES["TracingConfig"]
