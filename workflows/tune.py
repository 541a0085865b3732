"""The `wmss tune` run: Ray Tune over the WMSS knobs (what it searches: wmss.tuning). Score once, tune many.

The shared stages (demo data and base model, Phase 1 SFT, `r1.score`) run once, as the WMSS run's stages
(workflows.wmss_pipeline) through the stage engine's manifest, in the tune run directory; pointed at a
`wmss run` directory they are "finished earlier, skipped". Each trial only draws its active set from the shared scores and runs JTWS with a
validation set: a Tune function trainable that builds and fits a TorchTrainer (Train V2) whose
TuneReportCallback forwards every `val_loss` report to Tune, where ASHA stops the weak trials early and
Optuna (seeded) proposes the next ones. Every trial is an MLflow run under the tune's parent run; the best
trial becomes `best-config.yaml`, a complete config for `wmss run`. A killed tune resumes with
`Tuner.restore` and keeps its finished trials, when its settings and the shared stages' outputs are those it
started with (wmss.resume); otherwise it refuses, naming the differences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from wmss.config import ConfigError, WMSSConfig, add_config_source_arguments, dump_config
from wmss.resume import guard_resume
from wmss.storage import Localizer, RunStore
from wmss.tuning import BEST_CONFIG, TRIALS_DIR, TUNE_DIR, apply_params, metric_plot, search_space, trial_concurrency
from wmss.workflow import Artifact, fingerprint, open_workflow, run_location, train_options
from workflows.wmss_pipeline import DEMO, score_stage, shared_inputs


def run_trial(params: dict, setup: dict) -> None:
    """One trial (the Tune function trainable): draw the active set with the trial's alpha/beta/gamma from
    the shared scores, then JTWS with the trial's lam, reporting `val_loss` to Tune as it trains."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from wmss.selection import select_active_set
    from wmss.training import load_active_set, train

    cfg = apply_params(WMSSConfig.model_validate(setup["config"]), params)
    store = RunStore(setup["run_dir"])  # on this trial's node: a URI run directory's local mirror
    for rel, key in setup["fetch"]:  # the shared stages' outputs, downloaded once per node
        store.fetch(rel, key)
    # and for its training workers, wherever they run
    localizer = Localizer(store.uri, str(store.local), tuple(map(tuple, setup["fetch"]))) if store.uri else None
    paths = {name: str(store.local / rel) if inside else rel for name, (rel, inside) in setup["paths"].items()}
    trial = f"{TRIALS_DIR}/{ray.tune.get_context().get_trial_id()}"
    c = cfg.ceda
    active = store.local / trial / "active.parquet"
    select_active_set(paths["scores"], active, alpha=c.alpha, beta=c.beta, gamma=c.gamma, formula=c.formula,
                      multiplier=c.multiplier, seed=c.seed, dedup=c.dedup, max_uncertified=c.max_uncertified)
    train(cfg.jtws.heads(paths["weak"], paths["strong"]), name="jtws", data=paths["data"],
          out=store.local / trial / "model", storage_path=store.durable(trial),
          options=train_options(cfg, cfg.jtws.training), active=load_active_set(active),
          on_bad_record=cfg.data.on_bad_record, validation=setup["validation"], val_every=cfg.tune.val_every,
          callbacks=[TuneReportCallback()], localizer=localizer)


def _validation_source(cfg: WMSSConfig, heldout: Artifact | None):
    """The validation records: `tune.val_data`, else the demo's held-out problems as chat rows."""
    if cfg.tune.val_data:
        return cfg.tune.val_data
    if heldout is None:
        raise ConfigError("tune.val_data: not set, and only the demo task (data.train: demo) has a built-in "
                          "held-out split; point tune.val_data at validation records (.jsonl/.json/.parquet)")
    from wmss.synthetic import training_rows

    return training_rows(json.loads(Path(heldout.path).read_text()))


def run_tune(cfg: WMSSConfig, run_dir: str | os.PathLike) -> dict:
    """Run (or resume) the tune in `run_dir` (a folder or an object-store URI); writes `best-config.yaml`
    there and returns
    {"config": the best WMSSConfig, "params": its trial parameters, "metric": its metric value,
    "trials": [one dict of parameters + metric per finished trial], "path": the local best-config.yaml}."""
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from wmss.storage import filesystem, is_uri

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "A new study created" line is not a stage event

    t = cfg.tune
    if t.val_data is None and cfg.data.train != DEMO:
        _validation_source(cfg, None)  # the config error, before any stage runs
    wf = open_workflow(cfg, run_dir)
    try:
        shared = shared_inputs(cfg, wf)
        used: dict[str, Artifact] = {name: shared[name] for name in ("data", "weak", "strong")}
        used["scores"] = score_stage(cfg, wf, 1, shared["data"], shared["weak"], shared["strong"])
        setup = {"config": cfg.model_dump(mode="json"), "run_dir": str(wf.store),
                 "fetch": [(rel, a.hash) for a in used.values() for rel in wf.finished.get(a.hash, [])],
                 # paths inside the run directory travel relative to it: a trial's node has its own mirror
                 "paths": {name: (wf.store.relative(a.path), True) if wf.store.relative(a.path) else (a.path, False)
                           for name, a in used.items()},
                 "validation": _validation_source(cfg, shared["heldout"])}
        # the trial itself only waits on its TorchTrainer, whose workers hold the CPUs/GPUs (Tune refuses 0)
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": 0.01})
        root = wf.store.durable()
        storage_fs, storage = filesystem(root) if is_uri(root) else (None, root)
        experiment = f"{root}/{TUNE_DIR}"
        # Tuner.restore keeps the saved search and trials whatever the config says now: it may only continue
        # a tune of these settings and these shared stages' outputs
        settings = {"tune": t.model_dump(), "jtws": cfg.jtws.model_dump(), "ceda": cfg.ceda.model_dump(),
                    "max_length": cfg.max_length, "on_bad_record": cfg.data.on_bad_record}
        inputs = {name: a.hash for name, a in used.items()}
        inputs["validation data"] = fingerprint(t.val_data) if t.val_data else shared["heldout"].hash
        if guard_resume(experiment, settings, inputs, has_state=tune.Tuner.can_restore(experiment), what="tune",
                        start_over=f"delete {experiment} or pass another --run-dir"):
            print(f"[wmss] tune: resuming {experiment} (finished trials are kept; settings and inputs match the "
                  "checkpoints')", flush=True)
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=storage_fs)
        else:
            concurrency = trial_concurrency(t, cfg.jtws.training, ray.cluster_resources())
            print(f"[wmss] tune: {t.num_samples} trials, {concurrency} at a time, {t.mode} {t.metric}", flush=True)
            tuner = tune.Tuner(
                trainable, param_space=search_space(t),
                tune_config=tune.TuneConfig(
                    num_samples=t.num_samples, max_concurrent_trials=concurrency,
                    search_alg=OptunaSearch(metric=t.metric, mode=t.mode, seed=t.seed),
                    # one report per validation: a trial is judged after its first and stopped at the rungs
                    scheduler=ASHAScheduler(metric=t.metric, mode=t.mode, max_t=1 << 20, grace_period=1)),
                run_config=tune.RunConfig(
                    name=TUNE_DIR, storage_path=storage, storage_filesystem=storage_fs, verbose=1,
                    callbacks=[MLflowLoggerCallback(
                        tracking_uri=wf.tracker.tracking_uri, experiment_name=cfg.mlflow.experiment,
                        tags={"mlflow.parentRunId": wf.tracker.parent_run_id, "wmss.stage": "tune.trial"})]))
        start = time.time()
        with wf.log_output("tune"):  # Tune's trial tables: logs/tune.log
            results = tuner.fit()
        trials = [{**r.config, t.metric: r.metrics[t.metric]} for r in results
                  if r.error is None and t.metric in (r.metrics or {})]
        if not trials:
            errors = "; ".join(str(r.error).splitlines()[0] for r in results if r.error is not None)
            raise RuntimeError(f"tune: no trial reported {t.metric!r}" + (f" (errors: {errors})" if errors else ""))
        best = results.get_best_result(metric=t.metric, mode=t.mode, scope="last")
        best_cfg = apply_params(cfg, best.config)
        wf.write_text(BEST_CONFIG, dump_config(best_cfg))
        value = float(best.metrics[t.metric])
        wf.tracker.log_artifact(wf.run_dir / BEST_CONFIG)
        numeric = {f"best/{k}": float(v) for k, v in best.config.items() if isinstance(v, (int, float))}
        wf.tracker.log_metrics({f"best/{t.metric}": value, **numeric, "tune/trials": len(trials),
                                "tune/wall_s": time.time() - start})
        wf.tracker.log_figure(metric_plot(trials, t.metric), "tune_metric")
        wf.tracker.log_artifact(wf.manifest.path)
    except BaseException:
        wf.tracker.finish("FAILED")
        raise
    wf.tracker.finish()
    return {"config": best_cfg, "params": dict(best.config), "metric": value, "trials": trials,
            "path": wf.run_dir / BEST_CONFIG}


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_source_arguments(parser, "the demo; its `tune:` section says what to search")
    parser.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<name>); "
                                          "a `wmss run` directory reuses its SFT and scores")


def run_tune_cli(args) -> int:
    """`wmss tune`: validate the config, tune (or resume), print the best trial and where its config is."""
    from wmss.config import load_config

    cfg = load_config(args.config, args.overrides)
    target = run_location(cfg, args.run_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    best = run_tune(cfg, target)
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
                     for k, v in best["params"].items())
    print(f"\n[wmss] best of {len(best['trials'])} trials: {cfg.tune.metric}={best['metric']:.4f} with {shown}")
    print(f"[wmss] wrote {target}/{BEST_CONFIG} (run it with `wmss run {best['path']}`)")
    return 0
