"""wmss.tracking against real MLflow (a SQLite store, and a real `mlflow server` on 127.0.0.1): the parent
and nested runs hold what was logged, resuming reopens the same runs, plots draw exactly the data given,
and `wmss compare` tabulates the eval runs."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from wmss.cli import main as wmss_main
from wmss.tracking import (Tracker, compare_table, entropy_scatter, file_sha256, flatten, git_sha, metric_history,
                           resolve_tracking_uri, training_curves, weight_histogram)

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, proxied artifacts) on a free local port; yields its URI and
    stops it by killing its process group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
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


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _log_like_a_train_worker(worker_info: dict, steps: range, scale: float = 1.0) -> None:
    """What rank 0 of a Ray Train worker does with StageRun.worker_info(): its own client, one batch per step."""
    client = MlflowClient(tracking_uri=worker_info["tracking_uri"])
    for step in steps:
        now = int(time.time() * 1000)
        client.log_batch(worker_info["run_id"], metrics=[
            Metric("train/loss", scale / step, now, step), Metric("train/margin_strong", scale * step, now, step),
            Metric("train/nontarget_mass_strong", 0.5 / step, now, step),
            Metric("train/nontarget_mass_mix", 0.6 / step, now, step)])


# ------------------------------------------------------------------------------------------ pure helpers


def test_tracking_uri_comes_from_config_then_environment_then_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path / "run") == f"sqlite:///{tmp_path.resolve() / 'run' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow.example:5000"
    assert resolve_tracking_uri("postgresql://u@db/mlflow", tmp_path) == "postgresql://u@db/mlflow"
    # a relative SQLite path is pinned to the current directory, so Ray workers elsewhere find the same file
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///sub/m.db", "x") == f"sqlite:///{tmp_path.resolve() / 'sub' / 'm.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db", "x") == "sqlite:////abs/m.db"


@pytest.mark.parametrize("file_store", ["./mlruns", "/abs/mlruns", "file:///abs/mlruns", "mlruns"])
def test_file_store_is_refused_naming_where_it_came_from(tmp_path, monkeypatch, file_store):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match=r"mlflow.tracking_uri in the config .*file store.*sqlite:///"):
        resolve_tracking_uri(file_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", file_store)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI environment variable"):
        resolve_tracking_uri(None, tmp_path)


def test_flatten_gives_dotted_keys_and_keeps_every_leaf():
    config = {"name": "demo", "sft": {"lr": 1e-5, "deepspeed": {"stage": 3}}, "eval": {"benchmarks": ["gsm8k"]},
              "tune": {}, "run_dir": None}
    assert flatten(config) == {"name": "demo", "sft.lr": 1e-5, "sft.deepspeed.stage": 3,
                               "eval.benchmarks": ["gsm8k"], "tune": {}, "run_dir": None}
    assert flatten({"a": {"b": 1}}, prefix="cfg.") == {"cfg.a.b": 1}


def test_file_sha256_matches_hashlib_and_a_directory_hash_tracks_names_and_contents(tmp_path):
    rng = np.random.default_rng(0)
    blob = rng.bytes(3 * (1 << 20) + 17)  # several read chunks
    (tmp_path / "big.bin").write_bytes(blob)
    assert file_sha256(tmp_path / "big.bin") == hashlib.sha256(blob).hexdigest()

    def tree(root: Path, files: dict[str, bytes]) -> str:
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return file_sha256(root)

    files = {"config.json": b"{}", "shards/b.safetensors": rng.bytes(1000), "shards/a.safetensors": rng.bytes(1000)}
    reference = hashlib.sha256("".join(f"{rel}\0{hashlib.sha256(files[rel]).hexdigest()}\n"
                                       for rel in sorted(files)).encode()).hexdigest()
    assert tree(tmp_path / "one", files) == reference
    assert tree(tmp_path / "two", dict(reversed(files.items()))) == reference  # creation order does not matter
    assert tree(tmp_path / "renamed", {**files, "config.json": b"", "config2.json": b"{}"}) != reference
    assert tree(tmp_path / "edited", {**files, "config.json": b"{ }"}) != reference
    with pytest.raises(FileNotFoundError, match="missing"):
        file_sha256(tmp_path / "missing")


def test_git_sha_is_the_checked_out_commit_or_none(tmp_path):
    def git(*args, cwd=tmp_path):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("x")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert git_sha(tmp_path) == git("rev-parse", "HEAD")
    assert len(git_sha(tmp_path)) == 40
    assert git_sha() == git("rev-parse", "HEAD", cwd=REPO)  # default: the checkout wmss runs from
    outside = tmp_path.parent / f"{tmp_path.name}-not-a-repo"
    outside.mkdir()
    assert git_sha(outside) is None
    with pytest.raises(NotADirectoryError):
        git_sha(tmp_path / "nope")


# ------------------------------------------------------------------------------------------ plots


def test_plots_draw_exactly_the_data_given():
    rng = np.random.default_rng(1)
    weak, strong = rng.gamma(2.0, 0.5, 300), rng.gamma(2.0, 0.4, 300)
    selected = rng.random(300) < 0.3
    ax = entropy_scatter(weak, strong, selected).axes[0]
    unselected_points, selected_points = (c.get_offsets() for c in ax.collections)
    np.testing.assert_array_equal(selected_points, np.c_[weak[selected], strong[selected]])
    np.testing.assert_array_equal(unselected_points, np.c_[weak[~selected], strong[~selected]])
    diagonal = ax.lines[0].get_xydata()
    np.testing.assert_array_equal(diagonal[:, 0], diagonal[:, 1])
    assert diagonal.min() == min(weak.min(), strong.min()) and diagonal.max() == max(weak.max(), strong.max())
    with pytest.raises(ValueError, match="one length"):
        entropy_scatter(weak, strong[:-1], selected)

    weights = rng.dirichlet(np.ones(500))
    ax = weight_histogram(weights).axes[0]
    assert sum(p.get_height() for p in ax.patches) == 500
    assert ax.lines[0].get_xdata()[0] == pytest.approx(1 / 500)

    history = {"loss": [(1, 2.0), (2, 1.5), (3, 1.2)], "nontarget_mass_strong": [(1, 0.3), (3, 0.1)],
               "nontarget_mass_mix": [(1, 0.4), (3, 0.2)], "tokens_per_s": [(1, 10.0)]}
    axes = training_curves(history).axes
    assert [a.get_title() for a in axes] == ["loss", "non-target mass 1 - p(y)"]
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for a in axes for line in a.lines}
    assert drawn == {k: v for k, v in history.items() if k != "tokens_per_s"}
    with pytest.raises(ValueError, match="tokens_per_s"):
        training_curves({"tokens_per_s": [(1, 10.0)]})


# ------------------------------------------------------------------------------------------ runs


def test_parent_and_nested_runs_hold_params_metrics_artifacts_and_plots(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root would be ./mlruns here
    config = {"name": "demo", "sft": {f"knob{i}": i for i in range(150)}, "note": "x" * 7000}
    (tmp_path / "config.yaml").write_text("name: demo\n")
    tracker = Tracker(store, "runs-test", "demo", tags={"wmss.git_sha": "abc", "wmss.data_hash": "d" * 64})
    tracker.log_params(flatten(config))
    tracker.log_artifact(tmp_path / "config.yaml")
    rng = np.random.default_rng(2)
    with tracker.stage("score") as score:
        score.log_metrics({"scoring/entropy_weak_mean": 1.25, "scoring/unique": 40})
        score.log_figure(entropy_scatter(rng.random(50), rng.random(50), rng.random(50) < 0.5), "entropy_scatter")
        score.log_figure(weight_histogram(rng.dirichlet(np.ones(50))), "weights.png")
    with tracker.stage("jtws") as jtws:
        _log_like_a_train_worker(jtws.worker_info(), range(1, 6))
        jtws.log_params({"mix_lambda": 0.5})
        jtws.log_figure(training_curves(metric_history(store, jtws.run_id)), "training_curves")
    tracker.log_metrics({"eval/gsm8k/accuracy": 0.5}, step=1)
    tracker.finish()

    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "demo"
    assert parent.data.tags["wmss.git_sha"] == "abc" and parent.data.tags["wmss.data_hash"] == "d" * 64
    assert len(parent.data.params) == 152 and parent.data.params["sft.knob149"] == "149"
    assert parent.data.params["note"] == "x" * 6000  # MLflow's limit; the full value is in the config artifact
    assert parent.data.metrics == {"eval/gsm8k/accuracy": 0.5}
    assert _artifact_paths(client, parent.info.run_id) == {"config.yaml"}

    nested = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'", order_by=["start_time ASC"])
    assert [(r.info.run_name, r.data.tags["wmss.stage"], r.info.status) for r in nested] == [
        ("score", "score", "FINISHED"), ("jtws", "jtws", "FINISHED")]
    score_run, jtws_run = nested
    assert score_run.data.metrics == {"scoring/entropy_weak_mean": 1.25, "scoring/unique": 40}
    assert _artifact_paths(client, score_run.info.run_id) == {"plots/entropy_scatter.png", "plots/weights.png"}
    assert jtws_run.data.params == {"mix_lambda": "0.5"}
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(jtws_run.info.run_id, "train/loss"),
                                              key=lambda m: m.step)] == [(s, 1 / s) for s in range(1, 6)]
    png = client.download_artifacts(jtws_run.info.run_id, "plots/training_curves.png", str(tmp_path / "dl"))
    assert Path(png).read_bytes()[:8] == PNG_MAGIC

    # artifacts sit beside the database, not under the current directory
    artifact_root = client.get_experiment(parent.info.experiment_id).artifact_location
    assert artifact_root == (Path(store.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    assert not (tmp_path / "mlruns").exists()


def test_the_outcome_lands_on_the_parent_run_of_a_training_experiment(store, tmp_path, monkeypatch):
    """What a user sees without expanding anything: accuracy and delta vs SFT per method and benchmark as
    parent-run metrics, stage wall times, the table as an MLflow table and as the run's description; the
    experiment opens on MLflow's training-runs view."""
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(store, "outcome-test", "demo")
    results = {"base": {"gsm8k": 0.25, "synthetic": None}, "sft": {"gsm8k": 0.5}, "wmss": {"gsm8k": 0.625}}
    tracker.log_results(results, "TABLE TEXT", {"sft": 12.5, "r1.jtws": 30.0})
    tracker.finish()
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.metrics == {"base/gsm8k/accuracy": 0.25, "base/gsm8k/delta_vs_sft": -0.25,
                                   "sft/gsm8k/accuracy": 0.5, "wmss/gsm8k/accuracy": 0.625,
                                   "wmss/gsm8k/delta_vs_sft": 0.125, "wall_s/sft": 12.5, "wall_s/r1.jtws": 30.0}
    assert "TABLE TEXT" in parent.data.tags["mlflow.note.content"]
    assert "results_table.json" in _artifact_paths(client, parent.info.run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_failed_stage_is_marked_and_a_rerun_resumes_the_same_runs(store):
    tracker = Tracker(store, "resume-test", "wf", tags={"wmss.git_sha": "old"})
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.stage("sft") as sft:
            _log_like_a_train_worker(sft.worker_info(), range(1, 4))
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(sft.run_id).info.status == "FAILED"

    # the rerun of the run directory: same parent, same stage run, steps after the checkpoint logged again
    again = Tracker(store, "resume-test", "wf", parent_run_id=tracker.parent_run_id, tags={"wmss.git_sha": "new"})
    assert again.parent_run_id == tracker.parent_run_id
    parent = client.get_run(again.parent_run_id)
    assert parent.info.status == "RUNNING" and parent.data.tags["wmss.git_sha"] == "new"
    with again.stage("sft", run_id=sft.run_id) as resumed:
        assert client.get_run(sft.run_id).info.status == "RUNNING"
        _log_like_a_train_worker(resumed.worker_info(), range(2, 5), scale=10.0)
    assert resumed.run_id == sft.run_id and client.get_run(sft.run_id).info.status == "FINISHED"
    history = metric_history(store, sft.run_id)
    assert history["loss"] == [(1, 1.0), (2, 5.0), (3, 10 / 3), (4, 2.5)]  # newest value per step
    assert set(history) == {"loss", "margin_strong", "nontarget_mass_strong", "nontarget_mass_mix"}
    again.finish("KILLED")
    assert client.get_run(again.parent_run_id).info.status == "KILLED"

    with pytest.raises(ValueError, match="as stage 'jtws'.*it is stage 'sft'"):
        with again.stage("jtws", run_id=sft.run_id):
            pass
    assert client.get_run(sft.run_id).info.status == "FINISHED"  # refused before anything changed
    with pytest.raises(ValueError, match="not found at"):
        Tracker(store, "resume-test", "wf", parent_run_id="0" * 32)
    with pytest.raises(ValueError, match="belongs to experiment"):
        Tracker(store, "another-experiment", "wf", parent_run_id=tracker.parent_run_id)


def _workflow_with_evals(uri: str, experiment: str, name: str, evals: dict[str, dict[str, float]]) -> None:
    tracker = Tracker(uri, experiment, name)
    with tracker.stage("sft") as sft:  # a stage without wmss.method is not a row
        sft.log_metrics({"eval/gsm8k/accuracy": 0.99})
    for method, metrics in evals.items():
        with tracker.stage(f"eval-{method}", tags={"wmss.method": method}) as run:
            run.log_metrics(metrics)
    tracker.finish()


def test_compare_prints_methods_by_benchmarks(store, capsys, monkeypatch):
    _workflow_with_evals(store, "compare-test", "wf-a", {
        "sft": {"eval/gsm8k/accuracy": 0.5, "eval/svamp/accuracy": 0.25, "eval/gsm8k/n_problems": 1319},
        "wmss": {"eval/gsm8k/accuracy": 0.625, "eval/svamp/accuracy": 0.3125, "eval/gsm8k/n_problems": 1319}})
    _workflow_with_evals(store, "compare-test", "wf-b-longer-name", {"base": {"eval/gsm8k/accuracy": 0.125}})
    _workflow_with_evals(store, "compare-other", "wf-c", {"undial": {"eval/aqua/accuracy": 0.75}})

    table = compare_table(store, "compare-test")
    lines = table.splitlines()
    rows = lines[:lines.index("")]
    assert [line.split() for line in rows] == [
        ["workflow", "method", "gsm8k", "svamp", "gsm8k/n_problems"],
        ["wf-a", "sft", "0.5000", "0.2500", "1319"],
        ["wf-a", "wmss", "0.6250", "0.3125", "1319"],
        ["wf-b-longer-name", "base", "0.1250", "-", "-"]]
    assert len({len(line) for line in rows}) == 1  # aligned: numbers right-justified to one width per column
    everywhere = [line.split()[:2] for line in compare_table(store).splitlines()[1:] if line.startswith("wf-")]
    assert everywhere == [["wf-a", "sft"], ["wf-a", "wmss"], ["wf-b-longer-name", "base"], ["wf-c", "undial"]]

    Tracker(store, "compare-empty", "wf").finish()
    assert "no evaluated runs" in compare_table(store, "compare-empty")
    with pytest.raises(LookupError, match="no MLflow experiment 'nope'.*compare-test"):
        compare_table(store, "nope")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert wmss_main(["compare", "--tracking-uri", store, "--experiment", "compare-test"]) == 0
    assert capsys.readouterr().out == table + "\n"
    assert wmss_main(["compare", "--run-dir", str(Path(store.removeprefix("sqlite:///")).parent),
                      "--experiment", "compare-test"]) == 0
    assert capsys.readouterr().out == table + "\n"
    db = Path(store.removeprefix("sqlite:///"))
    assert wmss_main(["compare", "--run-dir", str(db.parent / "elsewhere")]) == 2
    assert f"no MLflow database at {db.parent / 'elsewhere' / 'mlflow.db'}" in capsys.readouterr().err
    assert not (db.parent / "elsewhere").exists()
    assert wmss_main(["compare", "--tracking-uri", store, "--experiment", "nope"]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def test_tracker_logs_through_a_real_mlflow_server(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server, "server-test", "wf-server", tags={"wmss.run_dir": str(tmp_path)})
    tracker.log_params({"sft.lr": 1e-5})
    with tracker.stage("jtws") as jtws:
        _log_like_a_train_worker(jtws.worker_info(), range(1, 4))
        jtws.log_figure(training_curves(metric_history(mlflow_server, jtws.run_id)), "training_curves")
    with tracker.stage("eval-wmss", tags={"wmss.method": "wmss"}) as evaluation:
        evaluation.log_metrics({"eval/gsm8k/accuracy": 0.75})
    tracker.finish()

    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params == {"sft.lr": "1e-05"}
    assert parent.data.tags["wmss.run_dir"] == str(tmp_path)
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'",
                                order_by=["start_time ASC"])
    assert [(r.info.run_name, r.info.status) for r in nested] == [("jtws", "FINISHED"), ("eval-wmss", "FINISHED")]
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(jtws.run_id, "train/margin_strong"),
                                              key=lambda m: m.step)] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert _artifact_paths(client, jtws.run_id) == {"plots/training_curves.png"}
    png = client.download_artifacts(jtws.run_id, "plots/training_curves.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == PNG_MAGIC
    assert compare_table(mlflow_server, "server-test").splitlines()[1].split() == ["wf-server", "wmss", "0.7500"]
