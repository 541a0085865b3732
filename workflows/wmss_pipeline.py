"""The WMSS run, one stage per step of the method (the stage engine is wmss.workflow):

    Phase 1   sft           M_strong = SFT(M0, D)                    (skipped when models.strong is given)
    Phase 2   r{k}.score    entropy of every sample under weak and strong (Ray Data)
              r{k}.select   CEDA weights + active-set draw
    Phase 3   r{k}.jtws     joint training on mixed logits; keep the strong model
    baselines baseline.*    one more SFT epoch from M_strong (plain / NEFTune / UNDIAL): the equal budget
    evaluate  eval.*        every method's model on the same benchmarks

Stages take and return `Artifact`s (path + hash); a rerun skips finished stages, resumes an unfinished one
and re-runs what changed, with everything downstream of it (see wmss.workflow).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from wmss.config import ACTIVE_SET_BASELINES, MIX_BASELINES, WMSSConfig, add_config_source_arguments
from wmss.workflow import Artifact, StageContext, Workflow, open_workflow, run_location, train_options

DEMO = "demo"


# ----------------------------------------------------------------------------------------- the stages


def _demo_base(cfg: WMSSConfig, stage: StageContext) -> dict:
    from wmss.models import load_tokenizer, make_tiny_model, pretrain_lm
    from wmss.synthetic import pretraining_texts

    d = cfg.demo
    init = make_tiny_model(stage.dir / "init", seed=d.seed, layers=d.layers, hidden=d.hidden, heads=d.hidden // 64,
                           vocab=d.vocab)
    tokenizer = load_tokenizer(init)
    texts = pretraining_texts(d.pretrain_texts, d.seed + 1,
                              lambda messages: tokenizer.apply_chat_template(messages, tokenize=False))
    model = pretrain_lm(init, texts, stage.dir / "model", steps=d.pretrain_steps, lr=d.pretrain_lr,
                        batch_size=d.pretrain_batch, seed=d.seed)
    shutil.rmtree(init)
    return {"model": str(model)}


def _demo_data(cfg: WMSSConfig, stage: StageContext) -> dict:
    from wmss.synthetic import make_splits, training_rows

    train, heldout = make_splits(cfg.demo.n_train, cfg.demo.n_eval, cfg.demo.seed)
    rows = training_rows(train)
    path = stage.dir / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stage.dir / "heldout.json").write_text(json.dumps(heldout))
    (stage.dir / "train-eval.json").write_text(json.dumps(train[:cfg.demo.n_train_eval]))
    return {"train": str(path), "heldout": str(stage.dir / "heldout.json"), "train_eval": str(stage.dir / "train-eval.json")}


def _sft(cfg: WMSSConfig, data: Artifact, model: Artifact, options, stage: StageContext,
         active: Artifact | None = None, name: str = "sft") -> dict:
    from wmss.training import load_active_set, sft_heads, train

    out = train(sft_heads(model.path), name=name, data=data.path, out=stage.dir / "model", options=options,
                active=load_active_set(active.path) if active else None, storage_path=stage.storage,
                localizer=stage.localizer, mlflow_info=stage.run.worker_info(), on_bad_record=cfg.data.on_bad_record)
    _log_curves(stage.run)
    return {"model": str(out)}


def _log_curves(run) -> None:
    from wmss.tracking import metric_history, training_curves

    history = metric_history(run.tracking_uri, run.run_id)
    if history:
        run.log_figure(training_curves(history), "training_curves")


def _score(cfg: WMSSConfig, data: Artifact, weak: Artifact, strong: Artifact, stage: StageContext,
           name: str) -> dict:
    import pyarrow.parquet as pq

    from wmss.scoring import score_entropy

    s = cfg.scoring
    out = score_entropy({"weak": weak.path, "strong": strong.path}, data.path, stage.dir / "scores.parquet",
                        backend=s.backend, max_length=cfg.max_length, actors=(s.actors.min, s.actors.max),
                        gpus_per_actor=s.gpus_per_actor, cpus_per_actor=s.cpus_per_actor, top_k=s.top_k,
                        token_budget=s.token_budget, dtype=s.dtype, on_bad_record=cfg.data.on_bad_record,
                        localizer=stage.localizer)
    table = pq.read_table(out)
    hw, hs = table.column("entropy_weak").to_numpy(), table.column("entropy_strong").to_numpy()
    below = float((hs < hw).mean())
    stage.run.log_metrics({"entropy_weak/mean": float(hw.mean()), "entropy_weak/std": float(hw.std()),
                           "entropy_strong/mean": float(hs.mean()), "entropy_strong/std": float(hs.std()),
                           "strong_below_weak": below})
    # the method's regime: training lowered the entropy of (most) samples, and CEDA's beta term has work to do
    print(f"[wmss] {name}: H_strong < H_weak on {100 * below:.1f} % of {len(hw)} samples (mean "
          f"{hw.mean():.3f} -> {hs.mean():.3f} nats/token)", flush=True)
    return {"scores": str(out)}


def _select(cfg: WMSSConfig, scores: Artifact, stage: StageContext) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from wmss.curriculum import sampling_weights
    from wmss.selection import select_active_set
    from wmss.tracking import entropy_scatter, weight_histogram

    c = cfg.ceda
    out = stage.dir / "active.parquet"
    summary = select_active_set(scores.path, out, alpha=c.alpha, beta=c.beta, gamma=c.gamma, formula=c.formula,
                                multiplier=c.multiplier, seed=c.seed + cfg.seed, dedup=c.dedup, max_uncertified=c.max_uncertified)
    stage.run.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    table = pq.read_table(scores.path)
    hw, hs = table.column("entropy_weak").to_numpy(), table.column("entropy_strong").to_numpy()
    chosen = set(pq.read_table(out).column("id").to_pylist())
    selected = np.array([i in chosen for i in table.column("id").to_pylist()])
    stage.run.log_figure(entropy_scatter(hw, hs, selected), "entropy_scatter")
    stage.run.log_figure(weight_histogram(sampling_weights(hw, hs, c.alpha, c.beta, c.gamma, c.formula)), "sampling_weights")
    return {"active": str(out), "summary": summary}


def _jtws(cfg: WMSSConfig, data: Artifact, weak: Artifact, strong: Artifact, active: Artifact | None,
          stage: StageContext, name: str = "jtws", method: str = "jtws") -> dict:
    from wmss.training import load_active_set, train

    j = cfg.jtws
    if method == "uniform-weak":  # the weak logits replaced by zeros: the strong model alone, z = lam * z_strong
        heads = [{"model": str(strong.path), "weight": j.lam, "trainable": True}]
    else:
        heads = j.heads(weak.path, strong.path)
    out = train(heads, name=name, data=data.path, out=stage.dir / "model",
                options=train_options(cfg, j.training), active=load_active_set(active.path) if active else None,
                storage_path=stage.storage,
                localizer=stage.localizer, mlflow_info=stage.run.worker_info(), on_bad_record=cfg.data.on_bad_record)
    _log_curves(stage.run)
    return {"model": str(out)}


def _random_like(cfg: WMSSConfig, weak: Artifact, stage: StageContext) -> dict:
    """The random-weak control's weak model: the weak model's architecture and tokenizer, freshly initialised
    (seeded by the run's `seed`), in the weak model's saved dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from wmss.models import load_tokenizer, save_model

    config = AutoConfig.from_pretrained(weak.path)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    return {"model": str(save_model(model, load_tokenizer(weak.path), stage.dir / "model"))}


def _mix_added_nontarget_mass(wf: Workflow, stage: str) -> float:
    """The label-smoothing control's default eps: the mean non-target mass the mix adds over the kept model
    alone at the first step of JTWS stage `stage` (its logged diagnostics)."""
    from wmss.errors import WmssError
    from wmss.tracking import metric_history

    history = metric_history(wf.tracker.tracking_uri, wf.manifest.stage(stage)["mlflow_run_id"])
    mix, kept = history.get("nontarget_mass_mix"), history.get("nontarget_mass_strong")
    if not mix or not kept:
        raise WmssError(f"label-smoothing: {stage} logged no non-target mass diagnostics to take eps from; set "
                        "baselines.label_smoothing")
    return max(mix[0][1] - kept[0][1], 1e-6)


def _evaluate(cfg: WMSSConfig, model: Artifact, problem_sets: dict[str, Artifact], stage: StageContext) -> dict:
    """Every benchmark of `cfg.eval`, and the demo's problem sets ({benchmark: JSON list of problems})."""
    from wmss.evaluation import evaluate

    e = cfg.eval
    extra = {name: json.loads(Path(a.path).read_text()) for name, a in problem_sets.items()} or None
    summary = evaluate(model.path, e.benchmarks, stage.dir, data_dir=e.data_dir, limit=e.limit, backend=e.backend,
                       max_new_tokens=e.max_new_tokens, extra_benchmarks=extra, mlflow_run=stage.run,
                       localizer=stage.localizer)
    return {"summary": {b: {k: v for k, v in s.items() if isinstance(v, (int, float))} for b, s in summary.items()}}


# ------------------------------------------------------------------------------------------- the driver


def shared_inputs(cfg: WMSSConfig, wf: Workflow, prefix: str = "") -> dict[str, Artifact | None]:
    """The stages before Phase 2 (demo data and base model, Phase 1 SFT) as artifacts: "data", "base",
    "strong", "weak", "heldout" (the demo's held-out problems; None for other data) and "problem_sets" (what
    the demo evaluates beside the benchmarks: the held-out problems as `synthetic`, the first
    `demo.n_train_eval` training problems as `synthetic-train`; empty for other data). Phase 1 depends on
    the run's seed, so its stage name takes `prefix` (see `run_stages`); the demo stages do not."""
    from wmss.models import resolve_model

    heldout, problem_sets = None, {}
    if cfg.data.train == DEMO:
        demo_data = wf.stage("demo.data", cfg.demo.model_dump(), {}, lambda s: _demo_data(cfg, s))
        data, heldout = demo_data.artifact("train"), demo_data.artifact("heldout")
        problem_sets = {"synthetic": heldout}
        if cfg.demo.n_train_eval:
            problem_sets["synthetic-train"] = demo_data.artifact("train_eval")
    elif isinstance(cfg.data.train, str):
        data = Artifact.external(cfg.data.train)
    else:  # a source spec or a mix: its own stage writes the selected records (wmss.datasource)
        from wmss.datasource import select_records, source_inputs

        sources = cfg.data.sources()
        data = wf.stage("data.select", {"sources": [s.model_dump() for s in sources],
                                        "on_bad_record": cfg.data.on_bad_record}, source_inputs(sources),
                        lambda s: select_records(sources, s.dir / "train.parquet",
                                                 on_bad_record=cfg.data.on_bad_record)).artifact("train")
    if cfg.models.base == DEMO:
        base = wf.stage("demo.base", cfg.demo.model_dump(), {}, lambda s: _demo_base(cfg, s)).artifact("model")
    else:
        base = Artifact.external(resolve_model(cfg.models.base))

    # Phase 1: M_strong = SFT(M0, D)
    if cfg.models.strong:
        strong = Artifact.external(resolve_model(cfg.models.strong))
    else:
        sft_opts = train_options(cfg, cfg.sft)
        strong = wf.stage(f"{prefix}sft", {"training": sft_opts.model_dump(), "on_bad_record": cfg.data.on_bad_record},
                          {"data": data, "base": base},
                          lambda s: _sft(cfg, data, base, sft_opts, s)).artifact("model")
    weak = Artifact.external(resolve_model(cfg.models.weak)) if cfg.models.weak else base
    return {"data": data, "heldout": heldout, "problem_sets": problem_sets, "base": base, "strong": strong,
            "weak": weak}


def score_stage(cfg: WMSSConfig, wf: Workflow, k: int, data: Artifact, weak: Artifact, strong: Artifact,
                prefix: str = "") -> Artifact:
    """Stage `r{k}.score` (Phase 2a): the entropies of `data` under `weak` and `strong`."""
    name = f"{prefix}r{k}.score"
    return wf.stage(name, {"scoring": cfg.scoring.model_dump(), "max_length": cfg.max_length,
                           "on_bad_record": cfg.data.on_bad_record},
                    {"data": data, "weak": weak, "strong": strong},
                    lambda s: _score(cfg, data, weak, strong, s, name)).artifact("scores")


def run_stages(cfg: WMSSConfig, wf: Workflow, prefix: str = "") -> dict[str, dict[str, dict]]:
    """Every stage of one WMSS run in `wf`; returns each method's evaluation summary per benchmark
    ({method: {benchmark: {"accuracy": ..., "nll": ..., ...}}}). Stages that depend on the run's seed are
    named `prefix` + their name, so several seeds share one workflow (`wmss study`) and the stages that do
    not depend on it (the demo's data and base model, the base model's evaluation) run once."""
    shared = shared_inputs(cfg, wf, prefix)
    data, problem_sets, strong, weak = shared["data"], shared["problem_sets"], shared["strong"], shared["weak"]
    models = {"base": shared["base"], "strong": strong}

    # Phases 2 and 3, K rounds: in round k+1 the weak model is round k's input strong model
    round_weak, round_strong = weak, strong
    chosen_rounds = []
    for k in range(1, cfg.rounds + 1):
        scores = score_stage(cfg, wf, k, data, round_weak, round_strong, prefix)
        chosen = wf.stage(f"{prefix}r{k}.select", {"ceda": cfg.ceda.model_dump(), "run_seed": cfg.seed}, {"scores": scores},
                          lambda s: _select(cfg, scores, s)).artifact("active")
        trained = wf.stage(f"{prefix}r{k}.jtws", {"jtws": train_options(cfg, cfg.jtws.training).model_dump(),
                                                   "mix": cfg.jtws.model_dump(exclude={"training"}),
                                                   "max_length": cfg.max_length, "on_bad_record": cfg.data.on_bad_record},
                           {"data": data, "weak": round_weak, "strong": round_strong, "active": chosen},
                           lambda s: _jtws(cfg, data, round_weak, round_strong, chosen, s)).artifact("model")
        chosen_rounds.append(chosen)
        round_weak, round_strong = round_strong, trained
    models["wmss"] = round_strong

    # the baselines, ablations and controls, each from M_strong on JTWS's training settings (equal budget;
    # wmss.config.BaselinesConfig); their training logs name the stage, not Phase 1 or Phase 3
    b = cfg.baselines
    for method in b.methods:
        name, inputs = f"{prefix}baseline.{method}", {"data": data, "strong": strong}
        active = chosen_rounds[0] if method in ACTIVE_SET_BASELINES else None  # round 1's active set
        if active:
            inputs["active"] = active
        if method in MIX_BASELINES:  # joint training with JTWS's settings
            mix_weak = weak
            if method == "random-weak":
                mix_weak = wf.stage(f"{prefix}random-weak.init", {"seed": cfg.seed}, {"weak": weak},
                                    lambda s: _random_like(cfg, weak, s)).artifact("model")
            done = wf.stage(name, {"jtws": train_options(cfg, cfg.jtws.training).model_dump(),
                                   "mix": cfg.jtws.model_dump(exclude={"training"}), "max_length": cfg.max_length,
                                   "on_bad_record": cfg.data.on_bad_record, "method": method},
                            {**inputs, "weak": mix_weak},
                            lambda s, w=mix_weak, a=active, n=name, m=method: _jtws(cfg, data, w, strong, a, s, n, m))
        else:
            update = b.training_update(method)
            if update.get("label_smoothing", 0) is None:
                update["label_smoothing"] = _mix_added_nontarget_mass(wf, f"{prefix}r1.jtws")
                print(f"[wmss] {name}: eps = {update['label_smoothing']:.4g}, the non-target mass the mix added at "
                      f"the first step of {prefix}r1.jtws", flush=True)
            opts = train_options(cfg, cfg.jtws.training, **update)
            done = wf.stage(name, {"training": opts.model_dump(), "on_bad_record": cfg.data.on_bad_record}, inputs,
                            lambda s, opts=opts, active=active, name=name: _sft(cfg, data, strong, opts, s, active, name))
        models[method] = done.artifact("model")

    # evaluate every method's model on the same problems
    summaries = {}
    methods = list(dict.fromkeys([*cfg.eval.methods, *b.methods]))  # the config checked every name
    for method in methods:
        evaluated = wf.stage(f"{'' if method == 'base' else prefix}eval.{method}",
                             {"eval": cfg.eval.model_dump(exclude={"methods"})},
                             {"model": models[method], **problem_sets},
                             lambda s, model=models[method]: _evaluate(cfg, model, problem_sets, s),
                             tags={"wmss.method": method})
        summaries[method] = evaluated.outputs["summary"]
    return summaries


def metric_table(summaries: dict[str, dict[str, dict]], metric: str = "accuracy") -> dict[str, dict[str, float]]:
    """{method: {benchmark: value}} of one metric from `run_stages`' summaries (benchmarks without it left out)."""
    return {method: {bench: s[metric] for bench, s in benches.items() if metric in s}
            for method, benches in summaries.items()}


def run_workflow(cfg: WMSSConfig, run_dir: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """Run (or resume) the whole workflow in `run_dir` (a folder or an object-store URI); writes
    results.txt (accuracy and gold-solution NLL per method) and results.json ({method: {benchmark:
    accuracy}}) there and returns every method's evaluation summary per benchmark (see `run_stages`)."""
    wf = open_workflow(cfg, run_dir)
    tracker, manifest = wf.tracker, wf.manifest
    try:
        summaries = run_stages(cfg, wf)
    except BaseException:
        tracker.finish("FAILED")
        raise
    from wmss.tracking import format_results, results_figure

    results, table = metric_table(summaries), format_results(metric_table(summaries), metric_table(summaries, "nll"))
    wf.write_text("results.txt", table + "\n")
    wf.write_text("results.json", json.dumps(results, indent=2, sort_keys=True) + "\n")
    for path in (wf.run_dir / "results.txt", manifest.path):
        tracker.log_artifact(path)
    tracker.log_results(results, table,
                        {name: stage["wall_s"] for name, stage in manifest.data["stages"].items() if "wall_s" in stage})
    tracker.log_figure(results_figure(results), "results")
    tracker.finish()
    return summaries


def add_run_arguments(parser) -> None:
    add_config_source_arguments(parser)
    parser.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<name>)")
    parser.add_argument("--force", action="store_true",
                        help="run even when `wmss plan` predicts a stage will not fit 80 GiB per GPU")


def run_cli(args) -> int:
    """`wmss run`: validate the config and its predicted GPU memory (before any Ray resources), run or
    resume, print the results."""
    from wmss.capacity import check_fits
    from wmss.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not args.force:
        check_fits(cfg)
    target = run_location(cfg, args.run_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from wmss.tracking import format_results

    start = time.time()
    summaries = run_workflow(cfg, target)
    print(f"\n[wmss] results (accuracy %; gold-solution NLL, nats/token; delta vs sft) — run dir {target}, "
          f"{time.time() - start:.0f} s")
    print(format_results(metric_table(summaries), metric_table(summaries, "nll")))
    return 0
