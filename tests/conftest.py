import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers import TESTDATA


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=150,
                     help="examples per fuzz test (CI runs the default; try 5000 for a long run)")


def pytest_configure(config):
    if not TESTDATA.is_dir():
        raise pytest.UsageError(f"TF Serving test data not found at {TESTDATA}")
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "remote_predict", max_examples=config.getoption("--fuzz-examples"), deadline=None, derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
    settings.load_profile("remote_predict")
