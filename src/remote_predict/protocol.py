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
PROFILER_SERVICE = "tensorflow.ProfilerService"  # TensorFlow's, served on the gRPC port as TF Serving does
