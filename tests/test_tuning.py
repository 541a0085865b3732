"""`wmss tune` on the demo: pure parts (search space on the simplex, concurrency from resources), then a
real 4-trial tune (local Ray, Optuna, ASHA, TorchTrainer + DeepSpeed, MLflow on SQLite) that is killed after
its first finished trial and resumed: scoring runs once, finished trials are not redone, every trial is an
MLflow run under the tune's parent run, best-config.yaml loads as a config, and a rerun with other settings
refuses to restore the tune. The tune's run directory starts with the demo data, base model and Phase 1 of
the session's shared demo run (conftest `demo_before_phase3`); scoring and the trials are the tune's own."""

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

from wmss.config import ConfigError, TrainingConfig, TuneConfig, load_config
from wmss.tuning import BEST_CONFIG, TRIALS_DIR, TUNE_DIR, apply_params, trial_concurrency

REPO = Path(__file__).resolve().parent.parent
TINY = [*REDUCED_DEMO, "jtws.training.global_batch=8", "tune.num_samples=4", "tune.max_concurrent_trials=1",
        "tune.val_every=2"]


def test_trial_params_keep_beta_on_the_simplex_and_the_config_valid():
    cfg = load_config(REPO / "configs" / "tune.yaml")
    chosen = apply_params(cfg, {"lam": 0.42, "alpha": 0.3, "gamma": 0.25, "formula": "paper-v2", "lr": 3e-4})
    assert chosen.jtws.lam == 0.42 and chosen.ceda.formula == "paper-v2" and chosen.jtws.training.lr == 3e-4
    assert chosen.ceda.alpha + chosen.ceda.beta + chosen.ceda.gamma == pytest.approx(1.0)
    assert chosen.ceda.dedup == cfg.ceda.dedup  # not searched: unchanged
    with pytest.raises(ConfigError, match=r"tune\.alpha\[1\] \+ tune\.gamma\[1\]"):
        load_config(REPO / "configs" / "tune.yaml", ["tune.alpha=[0.2,0.7]", "tune.gamma=[0.0,0.5]"])
    with pytest.raises(ConfigError, match=r"tune\.lam"):
        load_config(REPO / "configs" / "tune.yaml", ["tune.lam=[0.7,0.3]"])


def test_concurrency_follows_the_resources_each_trial_needs():
    two_workers = TrainingConfig(workers=2, cpus_per_worker=1.5)
    assert trial_concurrency(TuneConfig(), two_workers, {"CPU": 8}) == 2
    assert trial_concurrency(TuneConfig(), two_workers, {"CPU": 2}) == 1  # never zero
    on_gpus = TrainingConfig(workers=2, gpus_per_worker=1)
    assert trial_concurrency(TuneConfig(), on_gpus, {"CPU": 64, "GPU": 8}) == 4
    assert trial_concurrency(TuneConfig(max_concurrent_trials=3), on_gpus, {"CPU": 64, "GPU": 8}) == 3


@pytest.mark.ray
def test_validation_loss_is_the_kept_models_mean_token_ce(tmp_path, tiny_model_dir, demo_rows, ray_local):
    """The val_loss reported at the end of training equals a plain HF forward of the saved model."""
    import torch
    from transformers import AutoModelForCausalLM

    from wmss.data import records_from_rows, tokenize_records
    from wmss.models import load_tokenizer
    from wmss.training import sft_heads, train

    options = TrainingConfig(global_batch=8, micro_batch_tokens=1024, max_length=256, lr=2e-3, zero=0)
    out = train(sft_heads(tiny_model_dir), name="sft", data=demo_rows[:16], out=tmp_path / "model", options=options,
                validation=demo_rows[16:], val_every=1)
    reported = json.loads((out / "training.json").read_text())["metrics"]["val_loss"]
    samples, _ = tokenize_records(records_from_rows(demo_rows[16:], "<rows>")[0], load_tokenizer(out), 256)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    total = tokens = 0.0
    with torch.no_grad():
        for s in samples:
            labels = torch.tensor([s["labels"]])
            n = float((labels[:, 1:] != -100).sum())
            total += float(model(torch.tensor([s["input_ids"]]), labels=labels).loss) * n
            tokens += n
    assert reported == pytest.approx(total / tokens, rel=1e-4)


def _finished_trials(experiment: Path) -> set[str]:
    """Trial ids the Tuner's saved experiment state records as TERMINATED."""
    from ray.tune.experiment import Trial

    finished = set()
    for state in experiment.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (json.JSONDecodeError, KeyError, OSError):
            continue  # being rewritten; look again
        for trial_json, _run_meta in trials:
            trial = json.loads(trial_json)
            if trial.get("status") == Trial.TERMINATED:
                finished.add(trial["trial_id"])
    return finished


def _tune(run_dir: Path, log: Path, address: str, *extra: str) -> subprocess.Popen:
    # the tests' one local Ray: a second Ray instance on the same machine breaks Ray Train's placement-group
    # cleaner, which then cannot free the workers of a trial that ASHA stopped (ray-project/ray#65443)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow in the run directory
    args = [sys.executable, "-m", "wmss.cli", "tune", "--run-dir", str(run_dir), "--set", *TINY,
            f"ray.address={address}", *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.ray
def test_tune_scores_once_logs_every_trial_and_resumes_after_a_kill(tmp_path, ray_local, demo_before_phase3):
    import mlflow

    address = ray_local.get_runtime_context().gcs_address

    run_dir = tmp_path / "run"
    seed_run(demo_before_phase3, run_dir, stages=("demo.data", "demo.base", "sft"))  # not r1.score: the tune's own
    experiment = run_dir / TUNE_DIR
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    started = time.time()
    proc = _tune(run_dir, first_log, address)
    deadline = time.time() + 600
    while not _finished_trials(experiment) and proc.poll() is None and time.time() < deadline:
        time.sleep(2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver: Ray then ends its job's trials and Train runs
    proc.wait()
    time.sleep(10)  # let Ray reap the killed job's actors and placement groups
    done_before = _finished_trials(experiment)
    assert done_before, first_log.read_text()[-4000:]
    assert len(done_before) < 4, "the tune finished before it could be interrupted"
    # a trial ASHA stopped early has no model; the ones that ran to the end must not be trained again
    models_before = {t: path.stat().st_mtime_ns for t in done_before
                     if (path := run_dir / TRIALS_DIR / t / "model" / "model.safetensors").exists()}
    assert models_before

    proc = _tune(run_dir, second_log, address)
    assert proc.wait(timeout=900) == 0, second_log.read_text()[-4000:]
    print(f"4-trial tune with a kill and a resume: {time.time() - started:.0f} s")
    first, second = first_log.read_text(), second_log.read_text()
    # entropy scoring (and Phase 1) ran once for the whole experiment, never per trial
    assert (first + second).count("r1.score: running") == 1
    assert "[wmss] r1.score: finished earlier, skipped" in second and "[wmss] sft: finished earlier, skipped" in second
    assert "settings and inputs match the checkpoints'" in second
    finished = _finished_trials(experiment)
    assert len(finished) == 4 and done_before <= finished
    for trial, mtime in models_before.items():  # finished trials were not trained again
        assert (run_dir / TRIALS_DIR / trial / "model" / "model.safetensors").stat().st_mtime_ns == mtime

    # every trial is an MLflow run under the tune's parent run, with its params and val_loss
    manifest = json.loads((run_dir / "manifest.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("wmss").experiment_id],
                              f"tags.`mlflow.parentRunId` = '{manifest['mlflow_parent_run_id']}' "
                              "and tags.`wmss.stage` = 'tune.trial'")
    logged = {r.data.tags["trial_name"] for r in runs if "val_loss" in r.data.metrics}
    assert len(logged) == 4 and all({"lam", "alpha", "gamma"} <= set(r.data.params) for r in runs)
    parent = client.get_run(manifest["mlflow_parent_run_id"])
    assert "best/val_loss" in parent.data.metrics and parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert BEST_CONFIG in artifacts and "plots/tune_metric.png" in plots

    # the best trial as a complete config that `wmss run` / `wmss config show` accept
    best = load_config(run_dir / BEST_CONFIG)
    assert best.ceda.alpha + best.ceda.beta + best.ceda.gamma == pytest.approx(1.0)
    lowest = min(r.data.metrics["val_loss"] for r in runs if r.info.status == "FINISHED")  # not the killed ones
    assert parent.data.metrics["best/val_loss"] <= lowest + 1e-9
    shown = subprocess.run([sys.executable, "-m", "wmss.cli", "config", "show", str(run_dir / BEST_CONFIG)],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"lam: {best.jtws.lam}" in shown

    # Tuner.restore would keep the old search: a tune with other settings refuses, naming them
    changed = _tune(run_dir, tmp_path / "changed.log", address, "tune.val_every=3", "ceda.seed=5")
    assert changed.wait(timeout=300) == 2, (tmp_path / "changed.log").read_text()[-4000:]
    refusal = (tmp_path / "changed.log").read_text()
    assert "ceda.seed: 42 -> 5; tune.val_every: 2 -> 3" in refusal and f"delete {experiment}" in refusal
