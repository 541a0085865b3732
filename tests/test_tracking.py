"""wmss.tracking and wmss.compare against real MLflow (a SQLite store, and a real `mlflow server` on
127.0.0.1): the parent and nested runs hold what was logged, resuming reopens the same runs, plots draw
exactly the data given, a server that goes away mid-stage does not stop the logging worker, and
`wmss compare` puts workflow runs side by side."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from conftest import RESULTS, _free_port, log_workflow, mlflow_server
from mlflow import MlflowClient

from wmss.cli import main as wmss_main
from wmss.config import config_from_mapping, dump_config
from wmss.errors import ConfigError
from wmss.tracking import (WORKER_HTTP_SETTINGS, StageRun, Tracker, entropy_scatter, file_sha256, flatten, git_sha,
                           metric_history, resolve_tracking_uri, training_curves, weight_histogram)
from wmss.train_loop import _MetricLogger

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """A real `mlflow server` for the module (conftest.mlflow_server); its URI."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _log_like_a_train_worker(worker_info: dict, steps: range, scale: float = 1.0) -> None:
    """What rank 0 of a Ray Train worker does with StageRun.worker_info(): its own client, one batch per step
    (StageRun.in_worker less its process-wide HTTP settings, which would outlive the test)."""
    run = StageRun(MlflowClient(tracking_uri=worker_info["tracking_uri"]), **worker_info)
    for step in steps:
        run.log_metrics({"train/loss": scale / step, "train/margin_strong": scale * step,
                         "train/nontarget_mass_strong": 0.5 / step, "train/nontarget_mass_mix": 0.6 / step}, step)


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
    with pytest.raises(ConfigError, match=r"mlflow.tracking_uri in the config .*file store.*sqlite:///"):
        resolve_tracking_uri(file_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", file_store)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI environment variable"):
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
    experiment is tagged as model training (tests/test_mlflow_ui.py checks what MLflow's UI opens)."""
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


def _run_dir(folder: Path, parent_run_id: str, tracking_uri: str | None) -> Path:
    """What `wmss run` leaves in a run directory for compare: the manifest naming the parent run, config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"mlflow_parent_run_id": parent_run_id, "stages": {}}))
    (folder / "config.yaml").write_text(dump_config(config_from_mapping({"mlflow": {"tracking_uri": tracking_uri}})))
    return folder


def test_compare_puts_workflow_runs_side_by_side(store, tmp_path, capsys, monkeypatch):
    """Two workflow runs that differ in jtws.lam: one methods x benchmarks table each (accuracy %, the
    difference to sft in points) from the parent runs' metrics, the differing settings named, and MLflow's
    compare view of exactly those runs; selected by filter, name, run directory; errors are one line."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lam3 = log_workflow(store, "compare-test", "lam-0.3", {"jtws.lam": 0.3, "sft.lr": 1e-5}, RESULTS)
    lam5 = log_workflow(store, "compare-test", "lam-0.5", {"jtws.lam": 0.5, "sft.lr": 1e-5},
                        {**RESULTS, "wmss": {"synthetic": 0.75, "gsm8k": 0.25}})
    unfinished = log_workflow(store, "compare-test", "no-lam", {"sft.lr": 1e-5})
    Tracker(store, "compare-test", "not-a-workflow").finish()  # e.g. a standalone `wmss eval`: no wmss.run_dir
    log_workflow(store, "compare-other", "elsewhere", {"jtws.lam": 0.7}, RESULTS)
    capsys.readouterr()  # MLflow's lines about creating the store

    def compare(*flags: str) -> tuple[int, str, str]:
        code = wmss_main(["compare", "--tracking-uri", store, *flags])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = compare("--experiment", "compare-test", "--filter", "params.`jtws.lam` != ''")
    assert code == 0 and err == ""
    blocks = out.split("\n\n")
    assert blocks[0].splitlines() == [
        f"lam-0.3 · experiment compare-test · run {lam3.parent_run_id} · FINISHED",
        "differs: jtws.lam=0.3",
        "method             gsm8k     synthetic",
        "--------------------------------------",
        "base                   -  25.0 (-25.0)",
        "sft                 12.5          50.0",
        "wmss        25.0 (+12.5)  62.5 (+12.5)"]
    assert blocks[1].splitlines()[:2] == [f"lam-0.5 · experiment compare-test · run {lam5.parent_run_id} · FINISHED",
                                          "differs: jtws.lam=0.5"]
    assert blocks[1].splitlines()[-1] == "wmss        25.0 (+12.5)  75.0 (+25.0)"
    assert len(blocks) == 3  # the filter left out the run without jtws.lam and the one that is no workflow
    experiment_id = MlflowClient(tracking_uri=store).get_experiment_by_name("compare-test").experiment_id
    runs = quote(json.dumps([lam3.parent_run_id, lam5.parent_run_id], separators=(",", ":")))
    assert blocks[2].splitlines() == [  # MLflow 3's compare view of the same runs, in its training view
        "accuracy in %, (difference to sft in points)",
        f"MLflow: start `mlflow server --backend-store-uri {store} --port 5000`, then open",
        f"  experiment compare-test: http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning",
        f"  compare view: http://127.0.0.1:5000/#/compare-runs?runs={runs}&experiments="
        f"{quote(json.dumps([experiment_id]))}&workflowType=machine_learning"]

    # every workflow run of the store: the unfinished one says so; the other experiment's run is there too
    code, out, _ = compare()
    assert code == 0 and [b.split(" · ")[0] for b in out.split("\n\n")[:-1]] == [
        "lam-0.3", "lam-0.5", "no-lam", "elsewhere"]
    assert f"no-lam · experiment compare-test · run {unfinished.parent_run_id} · FINISHED\ndiffers: jtws.lam=-" in out
    assert "no results yet" in out
    # by name: one run, whose MLflow page is named instead
    code, out, _ = compare("--runs", "lam-0.5")
    assert code == 0 and out.startswith("lam-0.5 · ") and "differs" not in out
    assert out.rstrip().endswith(f"  run lam-0.5: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/"
                                 f"{lam5.parent_run_id}?workflowType=machine_learning")

    # by run directory: each one's manifest names its parent run, its config.yaml (or the default
    # <run dir>/mlflow.db, as `wmss run` resolves it) the store
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert wmss_main(["compare", "--run-dir", str(_run_dir(db_dir, lam5.parent_run_id, None)),
                      str(_run_dir(tmp_path / "r3", lam3.parent_run_id, store))]) == 0
    out = capsys.readouterr().out
    assert [b.split(" · ")[0] for b in out.split("\n\n")[:-1]] == ["lam-0.3", "lam-0.5"]  # oldest first
    assert "compare-runs?runs=" in out

    # errors: one line each, exit 2, naming what was wrong
    for flags, message in [
            (["--experiment", "nope"], "--experiment 'nope': no such MLflow experiment"),
            (["--filter", "params.lam ~ 1"], "--filter 'params.lam ~ 1': MLflow cannot use it"),
            (["--runs", "nobody"], "no workflow run (MLflow tag wmss.run_dir) at sqlite:"),
            (["--run-dir", str(tmp_path / "missing")], f"{tmp_path / 'missing'}/manifest.json: not found")]:
        code, out, err = compare(*flags)
        assert (code, out) == (2, ""), flags
        assert err.startswith(f"wmss compare: {message}") and err.count("\n") == 1, err
    assert wmss_main(["compare", "--run-dir", str(_run_dir(tmp_path / "r4", "0" * 32, None))]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow database at {tmp_path / 'r4' / 'mlflow.db'}" in err
    assert not (tmp_path / "r4" / "mlflow.db").exists()  # nothing created where nothing was
    code, _, err = compare("--run-dir", str(_run_dir(tmp_path / "r5", "0" * 32, store)))
    assert code == 2 and f"its MLflow run {'0' * 32} is not at {store}" in err


def test_tracker_logs_through_a_real_mlflow_server(server, tmp_path, capsys):
    tracker = Tracker(server, "server-test", "wf-server", tags={"wmss.run_dir": str(tmp_path)})
    tracker.log_params({"sft.lr": 1e-5})
    with tracker.stage("jtws") as jtws:
        _log_like_a_train_worker(jtws.worker_info(), range(1, 4))
        jtws.log_figure(training_curves(metric_history(server, jtws.run_id)), "training_curves")
    with tracker.stage("eval-wmss", tags={"wmss.method": "wmss"}) as evaluation:
        evaluation.log_metrics({"eval/gsm8k/accuracy": 0.75})
    tracker.finish()

    client = MlflowClient(tracking_uri=server)
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
    # compare prints the server's own address of the run
    capsys.readouterr()  # MLflow's "View run" lines
    assert wmss_main(["compare", "--tracking-uri", server, "--runs", "wf-server"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wf-server · experiment server-test") and "no results yet" in out
    assert out.rstrip().endswith(f"MLflow:\n  experiment server-test: {server}/#/experiments/{parent.info.experiment_id}"
                                 f"?workflowType=machine_learning\n  run wf-server: {server}/#/experiments/"
                                 f"{parent.info.experiment_id}/runs/{tracker.parent_run_id}?workflowType=machine_learning")


def test_training_goes_on_through_an_mlflow_outage(tmp_path, monkeypatch, caplog):
    """The tracking server goes away mid-stage: a Ray Train worker's logger (train_loop._MetricLogger) keeps
    each step's metrics and returns at once, saying so in one warning; the server comes back on the same port
    and store, and the kept metrics arrive with the stage's final flush. A run whose server stays away past
    its bounded time drops what it kept, with a warning that counts it."""
    for name, value in WORKER_HTTP_SETTINGS.items():  # what StageRun.in_worker sets in a worker, kept to this test
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.WARNING, logger="wmss.tracking")
    root, port = tmp_path / "server", _free_port()
    root.mkdir()
    with contextlib.ExitStack() as first_server:
        uri = first_server.enter_context(mlflow_server(root, port))
        tracker = Tracker(uri, "outage-test", "wf", tags={"wmss.run_dir": str(tmp_path)})
        stage = contextlib.ExitStack()  # the driver's stage stays open across the outage, as in a workflow
        run = stage.enter_context(tracker.stage("r1.jtws"))
        logger = _MetricLogger(run.worker_info(), prefix="jtws")
        logger.run.retry_s = 0.5
        dropping = StageRun(MlflowClient(tracking_uri=uri), uri, tracker.parent_run_id, retry_s=0.2, give_up_s=1.0)
        for step in (1, 2):
            logger.log({"loss": 1.0 / step}, step)
        assert not caplog.records

    # the server is gone: every step returns at once; one warning for the outage, not one per step
    slowest = 0.0
    for step in range(3, 9):
        started = time.monotonic()
        logger.log({"loss": 1.0 / step}, step)
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.2)  # a training step
    assert slowest < 1.0, f"a step waited {slowest:.1f} s for the dead server"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith(f"MLflow at {uri} is unreachable") and run.run_id in warnings[0]
    dropping.log_metrics({"kept_then_dropped": 1.0}, 1)
    time.sleep(1.1)
    dropping.log_metrics({"kept_then_dropped": 2.0}, 2)
    assert caplog.records[-1].getMessage().startswith(f"MLflow at {uri} unreachable for 1 s: dropped 2 metric value(s)")

    with mlflow_server(root, port):  # back, on the same port and store
        logger.run.flush()
        assert caplog.records[-1].getMessage() == (f"MLflow at {uri} is reachable again: run {run.run_id}'s kept "
                                                   "metrics and params were sent")
        stage.close()
        time.sleep(0.3)
        dropping.log_metrics({"kept_then_dropped": 3.0}, 3)
        tracker.finish()
        client = MlflowClient(tracking_uri=uri)
        assert [(m.step, m.value) for m in sorted(client.get_metric_history(run.run_id, "train/loss"),
                                                  key=lambda m: m.step)] == [(s, 1.0 / s) for s in range(1, 9)]
        assert client.get_run(run.run_id).info.status == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(tracker.parent_run_id, "kept_then_dropped")] \
            == [(3, 3.0)]
