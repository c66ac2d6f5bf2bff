"""remote-predict: TF Serving's RemotePredict op and a compatible model server, in Python.

Importing this package makes SavedModels that contain RemotePredict ops runnable in this process.
"""

import os
import sys

# Run as the `remote-predict` command, TensorFlow's C++ logging is limited to errors: TF logs a warning
# (with a Python traceback for py-func ops) for every failed graph run, which under a failing remote
# target means one log entry per request. The server logs failed remote calls itself, rate-limited.
# TF reads this once, when it is first imported; an explicit TF_CPP_MIN_LOG_LEVEL wins.
if os.path.basename(sys.argv[0] if sys.argv else "") == "remote-predict" or sys.argv[:1] == ["-m"]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from remote_predict.op import lookup as _lookup  # noqa: F401  (registers the lookup op's kernel)
from remote_predict.op.api import RemotePredictResult, run, run_returning_status
from remote_predict.op.stubs import PredictionStub, StubError, register_stub

__version__ = "0.1.0"

__all__ = [
    "PredictionStub",
    "RemotePredictLayer",
    "RemotePredictResult",
    "StubError",
    "__version__",
    "register_stub",
    "run",
    "run_returning_status",
]


def __getattr__(name: str):
    # Keras is imported only by those who use the layer.
    if name == "RemotePredictLayer":
        from remote_predict.op.keras_layer import RemotePredictLayer

        return RemotePredictLayer
    raise AttributeError(name)
