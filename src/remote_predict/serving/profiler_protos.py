"""The `tensorflow.ProfilerService` messages we parse and answer, which TensorFlow's pip package does not ship.

TensorFlow 2.21 ships Python modules for profiler_service.proto's dependencies (ProfileOptions, XSpace) but not
for the service's own messages. They are built here from their public field names and numbers, as
config_protos.py builds TF Serving's config messages, in a pool of their own (so that a package that does ship
profiler_service.proto into the default pool cannot clash with them), on the shipped ProfileOptions and XSpace.

Only the fields the service reads or answers are declared: a field a client sends that is not declared here
(TensorFlow's client sends ProfileRequest's `max_events` and `tools`) parses as an unknown field, kept in the
message as protobuf keeps them and never read. Declared, as in TensorFlow's profiler_service.proto:
ProfileRequest duration_ms, opts, repository_root, session_id, host_name, emit_xspace; ProfileResponse
empty_trace, xspace; TerminateRequest session_id; TerminateResponse (no fields). TensorFlow's own client
judges them: tests/test_profiler.py::test_the_declared_messages_round_trip_what_tensorflows_client_sends.
"""

from __future__ import annotations

from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
from tensorflow.tsl.profiler.protobuf import profiler_options_pb2, xplane_pb2

from remote_predict.serving import config_protos

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "tensorflow"
_SHIPPED = (profiler_options_pb2.DESCRIPTOR, xplane_pb2.DESCRIPTOR)  # the files our messages refer to

# (message, [(field, number, type, label, type_name)])
_MESSAGES = {
    "ProfileRequest": [
        ("duration_ms", 1, _F.TYPE_UINT64, _F.LABEL_OPTIONAL, None),  # deprecated for opts.duration_ms
        ("opts", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".tensorflow.ProfileOptions"),
        ("repository_root", 5, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("session_id", 6, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("host_name", 7, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("emit_xspace", 9, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
    ],
    "ProfileResponse": [
        ("empty_trace", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
        ("xspace", 8, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".tensorflow.profiler.XSpace"),
    ],
    "TerminateRequest": [
        ("session_id", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ],
    "TerminateResponse": [],
}


def _add_with_dependencies(pool: descriptor_pool.DescriptorPool, file: descriptor.FileDescriptor) -> None:
    for dependency in file.dependencies:
        _add_with_dependencies(pool, dependency)
    try:
        pool.FindFileByName(file.name)
    except KeyError:
        pool.AddSerializedFile(file.serialized_pb)


def _build():
    pool = descriptor_pool.DescriptorPool()
    for shipped in _SHIPPED:
        _add_with_dependencies(pool, shipped)
    config_protos.add_file(pool, name="remote_predict/tensorflow_profiler_service.proto", package=_PACKAGE,
                           syntax="proto3", messages=_MESSAGES, dependencies=[shipped.name for shipped in _SHIPPED])
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
            for name in _MESSAGES}


_CLASSES = _build()
ProfileRequest = _CLASSES["ProfileRequest"]
ProfileResponse = _CLASSES["ProfileResponse"]
TerminateRequest = _CLASSES["TerminateRequest"]
TerminateResponse = _CLASSES["TerminateResponse"]
