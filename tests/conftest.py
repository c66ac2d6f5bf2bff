import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers import TESTDATA


def pytest_configure(config):
    if not TESTDATA.is_dir():
        raise pytest.UsageError(f"TF Serving test data not found at {TESTDATA}")
