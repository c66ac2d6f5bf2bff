import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# S3 clients never ask this machine's instance metadata address for credentials: tests give them explicitly.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

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


_buckets = itertools.count()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One SeaweedFS S3 server on loopback for the session; tests each use their own bucket."""
    from seaweed import SeaweedStore

    store = SeaweedStore(tmp_path_factory.mktemp("seaweed"))
    yield store
    store.stop()


@pytest.fixture
def s3(seaweed, monkeypatch, request):
    """The session's S3 store, this process's environment pointed at it, and a fresh bucket for this test."""
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    name = f"t{next(_buckets)}-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    seaweed.bucket(name)
    return seaweed, name
