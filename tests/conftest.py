"""Shared fixtures: one tiny model per test session, one local Ray instance for the tests that need it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_EVAL = REPO.parent / "shared" / "data" / "eval"
# Ray's socket paths must stay short: a temp dir under /tmp, not pytest's long tmp_path
RAY_TMP = tempfile.mkdtemp(prefix="wmss-ray-")


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
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=RAY_TMP, log_to_driver=True,
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
