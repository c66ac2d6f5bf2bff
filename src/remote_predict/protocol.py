"""Small wire-level conventions shared by our clients and our server."""

# gRPC metadata a client sends to ask for `tensor_content` answers instead of typed value fields
# (TF Serving's default, which most clients read). Large tensors then move as one buffer.
TENSOR_ENCODING_KEY = "x-remote-predict-tensor-encoding"
TENSOR_CONTENT = "tensor_content"
TENSOR_CONTENT_METADATA = ((TENSOR_ENCODING_KEY, TENSOR_CONTENT),)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"

# W3C trace context (https://www.w3.org/TR/trace-context/): carried from a request to its RemotePredict calls.
TRACE_HEADERS = ("traceparent", "tracestate")
_MAX_TRACE_HEADER = 1024  # traceparent is 55 characters, tracestate at most 32 members of 256
PROFILER_SERVICE = "tensorflow.ProfilerService"  # TensorFlow's, served on the gRPC port as TF Serving does


def trace_context(pairs) -> dict[str, str]:
    """The W3C trace context headers among `pairs` ((key, value) of gRPC metadata, HTTP headers or frame
    metadata), to continue and to send on. Values that could not travel as gRPC metadata or HTTP headers
    (not printable ASCII, or too long) are dropped here, at the door, so no call fails for a header it passes
    through; their syntax is OpenTelemetry's to check when tracing is on."""
    return {k: v for k, v in pairs if k in TRACE_HEADERS and isinstance(v, str) and len(v) <= _MAX_TRACE_HEADER
            and v.isascii() and v.isprintable()}
