"""`wmss run` end to end on the reduced demo: killed during Phase 3 and resumed, a finished rerun that
touches nothing, a config change that re-runs exactly the affected stages, and what MLflow holds.

The run starts from a copy of the session's shared run (conftest `demo_before_phase3`: the stages before
Phase 3 finished, with their MLflow runs), so the first `wmss run` here skips them and goes straight to
Phase 3, where it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REDUCED_DEMO, seed_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# max_failures: a worker group that fails right after the resume (e.g. an actor of the killed driver's job
# still being torn down) restarts from the last checkpoint, as it would on a cluster
REDUCED = [*REDUCED_DEMO, "jtws.training.global_batch=2", "jtws.training.checkpoint_every=1",
           "jtws.training.max_failures=2"]


def _wmss_run(run_dir: Path, ray_address: str, extra: list[str] = (), **popen):
    cmd = [sys.executable, "-m", "wmss.cli", "run", "--run-dir", str(run_dir),
           "--set", *REDUCED, f"ray.address={ray_address}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return cmd, env


def _stages(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_local, demo_before_phase3):
    """Start the demo (its stages before Phase 3 copied from the shared run), kill the driver once Phase 3
    has written a checkpoint, run the same command again."""
    run_dir = tmp_path_factory.mktemp("wf") / "run"
    seed_run(demo_before_phase3, run_dir, mlflow_db=run_dir / "mlflow.db")
    address = ray_local.get_runtime_context().gcs_address
    cmd, env = _wmss_run(run_dir, address)
    first_log = run_dir.parent / "first-run.log"
    with open(first_log, "w") as log:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    checkpoints = run_dir / "stages" / "r1.jtws" / "model.checkpoints"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        # two checkpoint folders: the first is then registered (its upload finished before the next report)
        if _stages(run_dir).get("r1.jtws", {}).get("status") == "running" and len(list(checkpoints.glob("checkpoint_*"))) >= 2:
            break
        time.sleep(0.5)
    killed_in_phase3 = proc.poll() is None
    if killed_in_phase3:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_in_phase3, "the driver ended before Phase 3 checkpointed:\n" + first_log.read_text()[-4000:]
    before = _stages(run_dir)
    time.sleep(10)  # let Ray reap the killed driver's job
    t0 = time.time()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return {"run_dir": run_dir, "cmd": cmd, "env": env, "before": before,
            "resumed": resumed, "resume_s": time.time() - t0}


def test_killed_during_phase3_resumes_and_finishes(finished_run, demo_before_phase3):
    before = finished_run["before"]
    assert before["sft"]["status"] == "done" and before["r1.jtws"]["status"] == "running"
    out = finished_run["resumed"].stdout + finished_run["resumed"].stderr
    assert finished_run["resumed"].returncode == 0, out[-4000:]
    for stage in ("demo.data", "demo.base", "sft", "r1.score", "r1.select"):
        assert f"[wmss] {stage}: finished earlier, skipped" in out
    assert "[wmss] r1.jtws: unfinished earlier, resuming" in out
    assert "[wmss] jtws: resuming from the latest checkpoint" in out
    run_dir = finished_run["run_dir"]
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == {"base", "strong", "wmss", "sft"}
    assert all(set(r) == {"synthetic", "synthetic-train"} for r in results.values())  # held out, and seen in training
    assert all(0.0 <= acc <= 1.0 for r in results.values() for acc in r.values())
    assert "method" in out and "synthetic nll" in out  # the printed table, with the gold solutions' NLL
    assert "synthetic nll" in (run_dir / "results.txt").read_text()
    # the score stage (run by the shared run) says whether the run is in the method's regime
    assert "[wmss] r1.score: H_strong < H_weak on " in (demo_before_phase3.parent / "driver.log").read_text()
    stages = _stages(run_dir)
    assert all(s["status"] == "done" and s["wall_s"] > 0 for s in stages.values())


def test_finished_rerun_touches_nothing(finished_run):
    t0 = time.time()
    again = subprocess.run(finished_run["cmd"], env=finished_run["env"], capture_output=True, text=True, timeout=300)
    elapsed = time.time() - t0
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    stages = _stages(finished_run["run_dir"])
    assert all(f"[wmss] {name}: finished earlier, skipped" in out for name in stages)
    assert ": running" not in out
    assert elapsed < 60


def test_mlflow_holds_parent_nested_runs_metrics_and_plots(finished_run):
    from mlflow import MlflowClient

    run_dir = finished_run["run_dir"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parent = client.get_run(manifest["mlflow_parent_run_id"])
    assert parent.data.params["jtws.lam"] == "0.5" and parent.data.tags["wmss.git_sha"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["wmss.stage"]: r for r in children}
    assert set(by_stage) == set(manifest["stages"])
    assert "train/loss" in by_stage["sft"].data.metrics and "train/nontarget_mass_mix" in by_stage["r1.jtws"].data.metrics
    assert "eval/synthetic/accuracy" in by_stage["eval.wmss"].data.metrics
    artifacts = lambda run: {a.path for a in client.list_artifacts(run.info.run_id, "plots")}  # noqa: E731
    assert {"plots/entropy_scatter.png", "plots/sampling_weights.png"} <= artifacts(by_stage["r1.select"])
    assert "plots/training_curves.png" in artifacts(by_stage["r1.jtws"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "manifest.json"}


def test_config_change_reruns_the_stage_and_everything_after_it(finished_run):
    cmd = finished_run["cmd"] + ["ceda.seed=1"]
    changed = subprocess.run(cmd, env=finished_run["env"], capture_output=True, text=True, timeout=900)
    out = changed.stdout + changed.stderr
    assert changed.returncode == 0, out[-3000:]
    assert "[wmss] r1.select: re-running because ceda.seed: 42 -> 1" in out
    for stage in ("r1.jtws", "eval.wmss"):
        assert f"[wmss] {stage}: re-running because" in out
    for stage in ("sft", "r1.score", "baseline.sft", "eval.sft", "eval.strong"):
        assert f"[wmss] {stage}: finished earlier, skipped" in out


def test_invalid_config_fails_before_ray(tmp_path):
    done = subprocess.run([sys.executable, "-m", "wmss.cli", "run", "--run-dir", str(tmp_path / "r"),
                           "--set", "jtws.lam=2", "ceda.formula=v9"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "jtws.lam = 2" in done.stderr and "ceda.formula = 'v9'" in done.stderr and "'code' or 'paper-v2'" in done.stderr
    assert "Ray" not in done.stderr and not (tmp_path / "r").exists()


def test_comparison_workflow_adds_baselines_ablations_and_controls(finished_run):
    """The comparison workflow at reduced size: the finished run plus NEFTune, UNDIAL, both ablations and the
    three controls; only the new stages run, label smoothing's eps comes from the JTWS stage's first step,
    the uniform-weak control trains the strong model alone and random-weak a fresh weak model, and the
    table and plot cover every method."""
    from mlflow import MlflowClient

    from wmss.tracking import metric_history

    new = ["neftune", "undial", "ceda-only", "jtws-only", "uniform-weak", "random-weak", "label-smoothing"]
    methods = f"baselines.methods=[sft,{','.join(new)}]"
    cmd = finished_run["cmd"] + ["ceda.seed=1", methods]  # ceda.seed as the previous test left the run
    done = subprocess.run(cmd, env=finished_run["env"], capture_output=True, text=True, timeout=1500)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for stage in ("sft", "r1.select", "baseline.sft", "eval.sft"):
        assert f"[wmss] {stage}: finished earlier, skipped" in out
    for method in new:
        assert f"[wmss] baseline.{method}: running" in out and f"[wmss] eval.{method}: running" in out
    assert "[wmss] random-weak.init: running" in out
    run_dir = finished_run["run_dir"]
    table = (run_dir / "results.txt").read_text()
    for method in ("sft", *new, "wmss"):
        assert method in table
    stages = _stages(run_dir)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    parent = json.loads((run_dir / "manifest.json").read_text())["mlflow_parent_run_id"]
    assert "plots/results.png" in {a.path for a in client.list_artifacts(parent, "plots")}

    # label smoothing's eps: what the mix added to the kept model's non-target mass at r1.jtws's first step
    history = metric_history(f"sqlite:///{run_dir / 'mlflow.db'}", stages["r1.jtws"]["mlflow_run_id"])
    eps = history["nontarget_mass_mix"][0][1] - history["nontarget_mass_strong"][0][1]
    assert stages["baseline.label-smoothing"]["settings"]["training"]["label_smoothing"] == pytest.approx(max(eps, 1e-6))
    assert f"eps = {max(eps, 1e-6):.4g}" in out
    # the controls train on round 1's active set with JTWS's settings; uniform-weak mixes the strong model alone
    for method in ("uniform-weak", "random-weak"):
        entry = stages[f"baseline.{method}"]
        assert entry["inputs"]["active"] == stages["r1.select"]["hash"] and entry["settings"]["method"] == method
    assert stages["baseline.random-weak"]["inputs"]["weak"] == stages["random-weak.init"]["hash"]

    def trainable(stage):  # the stage's model as the manifest names it (a re-run stage lives in a new folder)
        return json.loads((run_dir / stages[stage]["outputs"]["model"] / "training.json").read_text())["metrics"]["trainable_params"]
    assert trainable("baseline.uniform-weak") < trainable("r1.jtws") == trainable("baseline.random-weak")


def test_given_models_and_data_need_no_earlier_stage(tmp_path, tiny_model_dir, demo_rows, ray_local):
    """models.base / models.strong / data.train given as paths: no demo or Phase-1 stage runs, and their
    fingerprints are what later stages hash."""
    from wmss.config import load_config
    from wmss.workflow import fingerprint, open_workflow
    from workflows.wmss_pipeline import shared_inputs

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows))
    cfg = load_config(None, [f"models.base={tiny_model_dir}", f"models.strong={tiny_model_dir}",
                             f"data.train={data}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    wf = open_workflow(cfg, tmp_path / "run")
    try:
        shared = shared_inputs(cfg, wf)
    finally:
        wf.tracker.finish()
    assert shared["strong"] == (str(tiny_model_dir), fingerprint(str(tiny_model_dir)))
    assert shared["weak"] == shared["base"] == shared["strong"] and shared["heldout"] is None
    assert shared["data"] == (str(data), fingerprint(str(data)))
    assert wf.manifest.data["stages"] == {}
