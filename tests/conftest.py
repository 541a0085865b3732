"""Shared fixtures: one tiny model per test session, one local Ray instance for the tests that need it, and
one run of the reduced demo up to Phase 3 that the workflow, object-store and tune tests start from."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
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


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1:`port` (default: a free one) over the SQLite store `root/mlflow.db`
    (artifacts proxied to `root/artifacts`) for the block; yields its URI. Stopped by killing its process
    group; started again on the same root and port, it serves the same runs."""
    port = port or _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / "server.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server on port {port} did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# A finished workflow run as MLflow holds it, for the tests of `wmss compare` and of MLflow's UI
RESULTS = {"base": {"synthetic": 0.25, "gsm8k": None}, "sft": {"synthetic": 0.5, "gsm8k": 0.125},
           "wmss": {"synthetic": 0.625, "gsm8k": 0.25}}


def log_workflow(uri: str, experiment: str, name: str, params: dict, results: dict | None = None):
    """A workflow run without training: its parent run (tagged wmss.run_dir, as `wmss run` opens it) with
    `params` and, when given, the `results` Tracker.log_results puts on it, and one nested eval stage. Returns
    its Tracker (finished)."""
    from wmss.tracking import Tracker

    tracker = Tracker(uri, experiment, name, tags={"wmss.run_dir": f"/runs/{name}"})
    tracker.log_params(params)
    with tracker.stage("eval.wmss", tags={"wmss.method": "wmss"}) as stage:
        stage.log_metrics({"eval/synthetic/accuracy": 0.99})  # not what compare reads: the parent's metrics are
    if results is not None:
        tracker.log_results(results, "table", {"sft": 1.0})
    tracker.finish()
    return tracker


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


# 24 samples, 2 per step -> 12 optimizer steps; lr high enough that every step visibly moves the weights
RESUME_FLAGS = dict(workers=2, zero=2, global_batch=2, micro_batch_tokens=256, max_length=256, lr=2e-3,
                    checkpoint_every=1, seed=3)


@pytest.fixture(scope="session")
def sft_reference(tmp_path_factory, tiny_model_dir, demo_rows) -> Path:
    """An uninterrupted SFT run of `demo_rows` with RESUME_FLAGS (2 workers, ZeRO-2): the model every
    interrupted run with these settings must end with, bitwise."""
    from wmss.config import TrainingConfig
    from wmss.training import sft_heads, train

    _local_ray()
    out = tmp_path_factory.mktemp("sft") / "model"
    train(sft_heads(tiny_model_dir), name="sft", data=demo_rows, out=out, options=TrainingConfig(**RESUME_FLAGS))
    return out


def _local_ray():
    """The tests' one local Ray (started on first use), as the `ray` module."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, _temp_dir=RAY_TMP, log_to_driver=True,  # dashboard on: see wmss.raycluster
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    return ray


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 4 logical CPUs (2 training workers + data tasks fit on 2 cores), shared by every
    test module that asks for it (started again if a module shut it down) and shut down at the end of the
    session."""
    yield _local_ray()


# ------------------------------------------------------------------------ the shared reduced demo run

# The reduced demo of the workflow-level tests (`wmss run`, `wmss tune`, the object-store run): these keys
# fix the hashes of every stage before Phase 3, so a test that extends them with Phase-3/eval/baseline keys
# only (as its own --set) can start from `demo_before_phase3`.
REDUCED_DEMO = ["demo.n_train=24", "demo.n_eval=4", "demo.pretrain_steps=3", "demo.pretrain_texts=200",
                "eval.max_new_tokens=16", "sft.global_batch=8", "sft.epochs=1", "jtws.training.epochs=1"]
BEFORE_PHASE3 = ("demo.data", "demo.base", "sft", "r1.score", "r1.select")


def manifest_stages(run_dir: Path) -> dict:
    """The stages of a local run directory's manifest ({} before it exists)."""
    path = Path(run_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
        return {}


@pytest.fixture(scope="session")
def demo_before_phase3(tmp_path_factory) -> Path:
    """A local run directory of `wmss run --set REDUCED_DEMO` in which every stage before Phase 3
    (BEFORE_PHASE3: demo data and base model, Phase 1 SFT, scoring, selection) is finished, with its MLflow
    database: the real driver, stopped (SIGKILL) as soon as it starts r1.jtws, whose manifest entry, folder
    and MLflow run are then removed. Built once per session; tests take copies with `seed_run` and run
    only the stages they are about. Read-only: never run anything in it."""
    ray = _local_ray()
    run_dir = tmp_path_factory.mktemp("demo-before-phase3") / "run"
    log = run_dir.parent / "driver.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow in the run directory
    cmd = [sys.executable, "-m", "wmss.cli", "run", "--run-dir", str(run_dir), "--set", *REDUCED_DEMO,
           f"ray.address={ray.get_runtime_context().gcs_address}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline and "r1.jtws" not in manifest_stages(run_dir):
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stages = manifest_stages(run_dir)
    assert all(stages.get(s, {}).get("status") == "done" for s in BEFORE_PHASE3) and "r1.jtws" in stages, (
        "the shared demo run did not reach Phase 3:\n" + log.read_text()[-4000:])
    time.sleep(3)  # let Ray reap the killed driver's job
    from mlflow import MlflowClient

    manifest = json.loads((run_dir / "manifest.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    for name in set(manifest["stages"]) - set(BEFORE_PHASE3):
        client.delete_run(manifest["stages"].pop(name)["mlflow_run_id"])
        shutil.rmtree(run_dir / "stages" / name, ignore_errors=True)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run_dir


# Phase 3 and one evaluation on top of the shared run (the console and fault tests): a checkpoint every step,
# and a worker group that fails right after a resume (an actor of a killed driver's job still being torn down)
# restarts from the last checkpoint, as it would on a cluster
PHASE3_DEMO = [*REDUCED_DEMO, "jtws.training.global_batch=8", "jtws.training.checkpoint_every=1",
               "jtws.training.max_failures=2", "baselines.methods=[]", "eval.methods=[wmss]"]


def wmss_run_command(run_dir: Path, *settings: str) -> tuple[list[str], dict]:
    """(argv, environment) of `wmss run` in `run_dir` with `--set settings` on the tests' local Ray, MLflow in
    the run directory."""
    cmd = [sys.executable, "-m", "wmss.cli", "run", "--run-dir", str(run_dir), "--set", *settings,
           f"ray.address={_local_ray().get_runtime_context().gcs_address}"]
    return cmd, {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


@pytest.fixture(scope="session")
def demo_phase3_run(tmp_path_factory, demo_before_phase3) -> dict:
    """`wmss run --set PHASE3_DEMO` continuing a copy of the shared run, uninterrupted: {"run_dir": its run
    directory, "done": the CompletedProcess}. What the console test reads and what the fault tests' interrupted
    runs must end with. Read-only."""
    run_dir = tmp_path_factory.mktemp("demo-phase3") / "run"
    seed_run(demo_before_phase3, run_dir)
    cmd, env = wmss_run_command(run_dir, *PHASE3_DEMO)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"run_dir": run_dir, "done": done}


def seed_run(source: Path, target: str | Path, stages=BEFORE_PHASE3, *, mlflow_db: Path | None = None) -> None:
    """Give the fresh run directory `target` (a folder or an object-store URI) the finished `stages` of the
    run directory `source`: their folders and manifest entries (hashes unchanged, so the driver skips them).
    With `mlflow_db` (the tracking database the driver will use, e.g. `<target>/mlflow.db`), `source`'s
    MLflow database is copied there with its artifacts beside it (mlartifacts/, as the driver lays them
    out), so the stages' runs stay nested under the run's parent; else the manifest names no MLflow runs
    and the driver starts a new parent run."""
    import sqlite3

    from wmss.storage import RunStore, is_uri

    manifest = json.loads((Path(source) / "manifest.json").read_text())
    manifest["stages"] = {name: entry for name, entry in manifest["stages"].items() if name in stages}
    assert set(manifest["stages"]) == set(stages), f"{source} has no finished {set(stages) - set(manifest['stages'])}"
    if mlflow_db is None:
        manifest = {"stages": {name: {k: v for k, v in entry.items() if k != "mlflow_run_id"}
                               for name, entry in manifest["stages"].items()}}
    mirror = Path(tempfile.mkdtemp(prefix="wmss-seed-")) if is_uri(target) else None
    store = RunStore(target, mirror=mirror)
    assert not (store.local / "manifest.json").exists(), f"{target} is not a fresh run directory"
    for name in stages:
        shutil.copytree(Path(source) / "stages" / name, store.local / "stages" / name)
        store.push(f"stages/{name}")  # a local run directory: nothing to upload
    if mlflow_db is not None:
        mlflow_db = Path(mlflow_db).resolve()
        assert not mlflow_db.exists(), f"{mlflow_db} exists"
        mlflow_db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(source) / "mlflow.db", mlflow_db)
        shutil.copytree(Path(source) / "mlartifacts", mlflow_db.parent / "mlartifacts")
        old, new = (Path(source) / "mlartifacts").resolve().as_uri(), (mlflow_db.parent / "mlartifacts").as_uri()
        db = sqlite3.connect(mlflow_db)
        with db:  # the copy's artifacts live beside the copy
            db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
            db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
        db.close()
    (store.local / "manifest.json").write_text(json.dumps(manifest, indent=2))
    store.push("manifest.json")
    if mirror is not None:
        shutil.rmtree(mirror)


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    os.environ.pop("RAY_ADDRESS", None)
