"""Shared fixtures: one tiny model per test session, one local Ray instance for the tests that need it."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_EVAL = REPO.parent / "shared" / "data" / "eval"
# Ray's socket paths must stay short: a temp dir under /tmp, not pytest's long tmp_path
RAY_TMP = tempfile.mkdtemp(prefix="wmss-ray-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object storage for the tests: an S3-compatible server (moto) on 127.0.0.1, started by `s3_bucket`. Its
# endpoint and credentials are in the environment before any Ray starts, so Ray's workers inherit them as
# a cluster's nodes inherit theirs; pyarrow and boto read the standard AWS_* variables.
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "wmss-test",
                   "AWS_SECRET_ACCESS_KEY": "wmss-test", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"})
# The node cache of the tests' Ray workers (and of drivers that do not set their own): a driver given another
# WMSS_CACHE stands for a second machine, whose mirror of an object-store run directory the workers lack.
os.environ.setdefault("WMSS_CACHE", tempfile.mkdtemp(prefix="wmss-cache-"))


@pytest.fixture(scope="session")
def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the test S3 server; returns its name."""
    import boto3

    name = f"wmss-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from wmss.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_weak_strong(tmp_path_factory) -> tuple[Path, Path]:
    """Two different tiny models with one tokenizer (the strong one wider), standing in for weak/strong."""
    from wmss.models import make_tiny_model

    root = tmp_path_factory.mktemp("pair")
    return make_tiny_model(root / "weak", seed=1), make_tiny_model(root / "strong", seed=2, hidden=192, heads=3)


@pytest.fixture(scope="session")
def demo_rows() -> list[dict]:
    from wmss.synthetic import make_problems, training_rows

    return training_rows(make_problems(24, seed=7))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 4 logical CPUs (2 training workers + data tasks fit on 2 cores), shared by every
    test module that asks for it (started again if a module shut it down) and shut down at the end of the
    session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, _temp_dir=RAY_TMP, log_to_driver=True,  # dashboard on: see wmss.raycluster
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield ray


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    os.environ.pop("RAY_ADDRESS", None)
