"""The WMSS driver workflow: the method, one line per stage.

    Phase 1   sft           M_strong = SFT(M0, D)                    (skipped when models.strong is given)
    Phase 2   r{k}.score    entropy of every sample under weak and strong (Ray Data)
              r{k}.select   CEDA weights + active-set draw
    Phase 3   r{k}.jtws     joint training on mixed logits; keep the strong model
    baselines baseline.*    one more SFT epoch from M_strong (plain / NEFTune / UNDIAL): the equal budget
    evaluate  eval.*        every method's model on the same benchmarks

Every stage records itself in `<run_dir>/manifest.json` (status, hash of its settings and inputs, outputs
with paths relative to the run directory, MLflow run id, wall time). A rerun skips finished stages whose
hash is unchanged, resumes an unfinished one (training continues from its last checkpoint, scoring from its
finished parts) and re-runs a stage whose settings or inputs changed, with everything downstream of it
(their hashes chain). The run directory may be an object-store URI (s3://, gs://: see wmss.storage).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wmss.config import ConfigError, WMSSConfig, add_config_source_arguments, dump_config
from wmss.io import write_json
from wmss.storage import RunStore, is_uri

DEMO = "demo"


class Manifest:
    """`manifest.json` of a run directory, rewritten atomically on every change (remote: uploaded whole
    after each change; the remote copy is the truth, a local mirror's copy is read again at start)."""

    def __init__(self, store: RunStore):
        self.store, self.path = store, store.local / "manifest.json"
        if store.uri is not None:
            self.path.unlink(missing_ok=True)
            store.pull("manifest.json")
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
        self.store.push("manifest.json")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def fingerprint(path: str) -> str:
    """Cheap identity of an external input: file content hash for files, (name, size, mtime) of every
    file for folders (model folders are GBs), the string itself for hub ids."""
    from wmss.tracking import file_sha256

    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        entries = sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in p.rglob("*") if f.is_file())
        return _digest(entries)
    return f"id:{path}"


@dataclass
class StageContext:
    """What a stage function gets: its folder, its MLflow run, and where its outputs live for good."""

    dir: Path  # where the stage writes (a URI run directory's local mirror)
    run: object  # its nested MLflow run (wmss.tracking.StageRun)
    storage: str  # where its training checkpoints go: this folder, or its URI in an object-store run dir
    localizer: object  # wmss.storage.Localizer for Ray workers reading earlier outputs (None: local run dir)


class Workflow:
    """Runs stages against the manifest and the MLflow parent run."""

    def __init__(self, config: WMSSConfig, store: RunStore, tracker, manifest: Manifest):
        self.config, self.store, self.tracker, self.manifest = config, store, tracker, manifest
        self.run_dir = store.local  # where stages read and write (a URI run directory's local mirror)
        self.finished: dict[str, list[str]] = {}  # stage hash -> the finished stage folders it names

    def localizer(self):
        """What Ray workers on other nodes need to read this run's finished outputs (None: local run dir)."""
        from wmss.storage import Localizer

        if self.store.uri is None:
            return None
        stages = tuple((rel, key) for key, rels in self.finished.items() for rel in rels)
        return Localizer(self.store.uri, str(self.store.local), stages)

    def fetch(self, *hashes: str) -> None:
        """Make the finished stages with these hashes (other values: ignored) present in the local folder."""
        for key in hashes:
            for rel in self.finished.get(key, []):
                self.store.fetch(rel, key)

    def _record(self, outputs: dict) -> tuple[dict, list[str]]:
        """`outputs` as kept in the manifest: paths inside the run directory made relative to it."""
        paths = {k: self.store.relative(v) for k, v in outputs.items() if isinstance(v, str)}
        paths = {k: rel for k, rel in paths.items() if rel is not None}
        return {**outputs, **paths}, sorted(paths)

    def write_text(self, rel: str, text: str) -> None:
        """Write a run-level file (config.yaml, results.*) atomically, and upload it to a URI run directory."""
        from wmss.io import atomic_path

        with atomic_path(self.run_dir / rel) as tmp:
            tmp.write_text(text)
        self.store.push(rel)

    def _resolve(self, entry: dict) -> dict:
        return {k: str(self.run_dir / v) if k in entry.get("paths", []) else v for k, v in entry["outputs"].items()}

    def stage(self, name: str, settings: dict, inputs: dict[str, str], fn: Callable[[StageContext], dict],
              tags: dict[str, str] | None = None) -> dict:
        """Run `fn(StageContext) -> outputs` unless an identical finished run exists. `inputs` maps
        input names to hashes (upstream stages' hashes or external fingerprints). Returns the outputs, with
        the stage's own hash under "hash"."""
        key = _digest({"stage": name, "settings": settings, "inputs": inputs})
        rel = f"stages/{name}"
        stage_dir = self.run_dir / rel
        old = self.manifest.stage(name)
        run_id = None
        if old and old.get("hash") == key:
            if old.get("status") == "done":
                print(f"[wmss] {name}: finished earlier, skipped", flush=True)
                self.finished.setdefault(key, []).append(rel)  # fetched only if a later stage reads it
                return {**self._resolve(old), "hash": key}
            print(f"[wmss] {name}: unfinished earlier, resuming", flush=True)
            run_id = old.get("mlflow_run_id")
        elif old:
            why = _changed_keys(old.get("settings", {}), settings) + [
                f"input {k} changed" for k in sorted(set(inputs) | set(old.get("inputs", {})))
                if inputs.get(k) != old.get("inputs", {}).get(k)]
            print(f"[wmss] {name}: re-running because " + "; ".join(why or ["its inputs changed"]), flush=True)
            self.store.remove(rel)  # stale checkpoints must never be resumed
        else:
            print(f"[wmss] {name}: running", flush=True)
        self.fetch(*inputs.values())
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with self.tracker.stage(name, run_id=run_id, tags={"wmss.stage": name, **(tags or {})}) as run:
            self.manifest.update(name, status="running", hash=key, settings=settings, inputs=inputs,
                                 mlflow_run_id=run.run_id, outputs={})
            outputs = fn(StageContext(stage_dir, run, self.store.durable(rel), self.localizer()))
            run.log_metrics({"wall_s": time.time() - start})
        earlier = old.get("wall_s", 0.0) if run_id else 0.0  # time spent before a resume counts too
        self.store.seal(rel, key)  # uploaded before the manifest says done
        self.finished.setdefault(key, []).append(rel)
        recorded, paths = self._record(outputs)
        self.manifest.update(name, status="done", outputs=recorded, paths=paths,
                             wall_s=round(earlier + time.time() - start, 3))
        print(f"[wmss] {name}: done in {time.time() - start:.0f} s", flush=True)
        return {**outputs, "hash": key}


# ----------------------------------------------------------------------------------------- the stages


def _demo_base(cfg: WMSSConfig, stage: StageContext) -> dict:
    from wmss.models import make_tiny_model, pretrain_lm
    from wmss.synthetic import corpus_lines

    d = cfg.demo
    init = make_tiny_model(stage.dir / "init", seed=d.seed, layers=d.layers, hidden=d.hidden, heads=d.hidden // 64)
    model = pretrain_lm(init, corpus_lines(2000, d.seed + 1), stage.dir / "model", steps=d.pretrain_steps,
                        lr=d.pretrain_lr, seed=d.seed)
    shutil.rmtree(init)
    return {"model": str(model)}


def _demo_data(cfg: WMSSConfig, stage: StageContext) -> dict:
    from wmss.synthetic import make_splits, training_rows

    train, heldout = make_splits(cfg.demo.n_train, cfg.demo.n_eval, cfg.demo.seed)
    rows = training_rows(train)
    path = stage.dir / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stage.dir / "heldout.json").write_text(json.dumps(heldout))
    return {"train": str(path), "heldout": str(stage.dir / "heldout.json")}


def _train_options(cfg: WMSSConfig, section, **extra):
    return section.model_copy(update={"max_length": section.max_length or cfg.max_length, **extra})


def _sft(cfg, data: str, model: str, options, stage: StageContext, active: str | None = None) -> dict:
    from wmss.training import load_active_set, sft_heads, train

    out = train(sft_heads(model), name="sft", data=data, out=stage.dir / "model", options=options,
                active=load_active_set(active) if active else None, storage_path=stage.storage,
                localizer=stage.localizer, mlflow_info=stage.run.worker_info(), on_bad_record=cfg.data.on_bad_record)
    _log_curves(stage.run)
    return {"model": str(out)}


def _log_curves(run) -> None:
    from wmss.tracking import metric_history, training_curves

    history = metric_history(run.tracking_uri, run.run_id)
    if history:
        run.log_figure(training_curves(history), "training_curves")


def _score(cfg: WMSSConfig, data: str, weak: str, strong: str, stage: StageContext) -> dict:
    import pyarrow.parquet as pq

    from wmss.scoring import score_entropy

    s = cfg.scoring
    out = score_entropy({"weak": weak, "strong": strong}, data, stage.dir / "scores.parquet", backend=s.backend,
                        max_length=cfg.max_length, actors=(s.actors.min, s.actors.max),
                        gpus_per_actor=s.gpus_per_actor, cpus_per_actor=s.cpus_per_actor, top_k=s.top_k,
                        token_budget=s.token_budget, dtype=s.dtype, localizer=stage.localizer)
    table = pq.read_table(out)
    for name in ("entropy_weak", "entropy_strong"):
        col = table.column(name).to_numpy()
        stage.run.log_metrics({f"{name}/mean": float(col.mean()), f"{name}/std": float(col.std())})
    return {"scores": str(out)}


def _select(cfg: WMSSConfig, scores: str, stage: StageContext) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from wmss.curriculum import sampling_weights
    from wmss.selection import select_active_set
    from wmss.tracking import entropy_scatter, weight_histogram

    c = cfg.ceda
    out = stage.dir / "active.parquet"
    summary = select_active_set(scores, out, alpha=c.alpha, beta=c.beta, gamma=c.gamma, formula=c.formula,
                                multiplier=c.multiplier, seed=c.seed, dedup=c.dedup, max_uncertified=c.max_uncertified)
    stage.run.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    table = pq.read_table(scores)
    hw, hs = table.column("entropy_weak").to_numpy(), table.column("entropy_strong").to_numpy()
    chosen = set(pq.read_table(out).column("id").to_pylist())
    selected = np.array([i in chosen for i in table.column("id").to_pylist()])
    stage.run.log_figure(entropy_scatter(hw, hs, selected), "entropy_scatter")
    stage.run.log_figure(weight_histogram(sampling_weights(hw, hs, c.alpha, c.beta, c.gamma, c.formula)), "sampling_weights")
    return {"active": str(out), "summary": summary}


def _jtws(cfg: WMSSConfig, data: str, weak: str, strong: str, active: str | None, stage: StageContext) -> dict:
    from wmss.training import load_active_set, train

    j = cfg.jtws
    out = train(j.heads(weak, strong), name="jtws", data=data, out=stage.dir / "model",
                options=_train_options(cfg, j.training), active=load_active_set(active) if active else None,
                storage_path=stage.storage,
                localizer=stage.localizer, mlflow_info=stage.run.worker_info(), on_bad_record=cfg.data.on_bad_record)
    _log_curves(stage.run)
    return {"model": str(out)}


def _evaluate(cfg: WMSSConfig, model: str, heldout: str | None, stage: StageContext) -> dict:
    from wmss.evaluation import evaluate

    e = cfg.eval
    extra = {"synthetic": json.loads(Path(heldout).read_text())} if heldout else None
    summary = evaluate(model, e.benchmarks, stage.dir, data_dir=e.data_dir, limit=e.limit, backend=e.backend,
                       max_new_tokens=e.max_new_tokens, extra_benchmarks=extra, mlflow_run=stage.run,
                       localizer=stage.localizer)
    return {"summary": {b: {k: v for k, v in s.items() if isinstance(v, (int, float))} for b, s in summary.items()}}


# ------------------------------------------------------------------------------------------- the driver


def run_location(cfg: WMSSConfig, run_dir: str | None) -> str:
    """The run directory: `--run-dir`, else the config's run_dir, else runs/<name>; local paths absolute."""
    target = run_dir or cfg.run_dir or str(Path("runs") / cfg.name)
    return target if is_uri(target) else str(Path(target).resolve())


def open_workflow(cfg: WMSSConfig, run_dir: str | os.PathLike) -> Workflow:
    """Open (or resume) the run directory's MLflow parent run, log the config's params once, write
    `config.yaml` and join Ray: what every driver (`wmss run`, `wmss tune`) does before its stages."""
    from wmss.raycluster import ensure_ray
    from wmss.tracking import Tracker, flatten, git_sha, resolve_tracking_uri

    if is_uri(run_dir) and not (cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError(f"mlflow.tracking_uri: not set, and the run directory {run_dir} is on object storage, "
                          "where the default SQLite store cannot live; set mlflow.tracking_uri (or "
                          "MLFLOW_TRACKING_URI) to a tracking server, e.g. http://mlflow:5000")
    store = RunStore(run_dir)
    manifest = Manifest(store)
    data_src = cfg.data.train
    tracker = Tracker(resolve_tracking_uri(cfg.mlflow.tracking_uri, store.local), cfg.mlflow.experiment, cfg.name,
                      parent_run_id=manifest.data.get("mlflow_parent_run_id"),
                      tags={"wmss.git_sha": git_sha() or "unknown", "wmss.run_dir": str(store),
                            "wmss.data_hash": data_src if data_src == DEMO else fingerprint(data_src)})
    manifest.data["mlflow_parent_run_id"] = tracker.parent_run_id
    manifest.save()
    if not manifest.data.get("params_logged"):
        tracker.log_params(flatten(cfg.model_dump(mode="json")))
        manifest.data["params_logged"] = True
        manifest.save()
    wf = Workflow(cfg, store, tracker, manifest)
    wf.write_text("config.yaml", dump_config(cfg))
    tracker.log_artifact(store.local / "config.yaml")
    ensure_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    return wf


def run_workflow(cfg: WMSSConfig, run_dir: str | os.PathLike) -> dict:
    """Run (or resume) the whole workflow in `run_dir` (a folder or an object-store URI); writes
    results.txt / results.json there and returns {method: {benchmark: accuracy}}."""
    wf = open_workflow(cfg, run_dir)
    tracker, manifest = wf.tracker, wf.manifest
    try:
        results = _run_stages(cfg, wf)
    except BaseException:
        tracker.finish("FAILED")
        raise
    from wmss.tracking import results_figure

    wf.write_text("results.txt", format_results(results) + "\n")
    wf.write_text("results.json", json.dumps(results, indent=2, sort_keys=True) + "\n")
    for path in (wf.run_dir / "results.txt", manifest.path):
        tracker.log_artifact(path)
    tracker.log_figure(results_figure(results), "results")
    tracker.finish()
    return results


def shared_inputs(cfg: WMSSConfig, wf: Workflow) -> dict:
    """The stages before Phase 2 (demo data and base model, Phase 1 SFT): {"data", "base", "strong",
    "weak": (path, hash)} and "heldout" (the demo's held-out problems file, None for other data)."""
    from wmss.models import resolve_model

    heldout = None
    if cfg.data.train == DEMO:
        demo_data = wf.stage("demo.data", cfg.demo.model_dump(), {}, lambda s: _demo_data(cfg, s))
        data, data_hash, heldout = demo_data["train"], demo_data["hash"], demo_data["heldout"]
    else:
        data, data_hash = cfg.data.train, fingerprint(cfg.data.train)
    if cfg.models.base == DEMO:
        base_stage = wf.stage("demo.base", cfg.demo.model_dump(), {}, lambda s: _demo_base(cfg, s))
        base, base_hash = base_stage["model"], base_stage["hash"]
    else:
        base = resolve_model(cfg.models.base)
        base_hash = fingerprint(base)

    # Phase 1: M_strong = SFT(M0, D)
    if cfg.models.strong:
        strong = resolve_model(cfg.models.strong)
        strong_hash = fingerprint(strong)
    else:
        sft_opts = _train_options(cfg, cfg.sft)
        phase1 = wf.stage("sft", {"training": sft_opts.model_dump()}, {"data": data_hash, "base": base_hash},
                          lambda s: _sft(cfg, data, base, sft_opts, s))
        strong, strong_hash = phase1["model"], phase1["hash"]
    weak = resolve_model(cfg.models.weak) if cfg.models.weak else base
    weak_hash = fingerprint(weak) if cfg.models.weak else base_hash
    return {"data": (data, data_hash), "heldout": heldout, "base": (base, base_hash),
            "strong": (strong, strong_hash), "weak": (weak, weak_hash)}


def score_stage(cfg: WMSSConfig, wf: Workflow, k: int, data: tuple, weak: tuple, strong: tuple) -> dict:
    """Stage `r{k}.score` (Phase 2a): the entropies of `data` under `weak` and `strong`, each (path, hash)."""
    return wf.stage(f"r{k}.score", {"scoring": cfg.scoring.model_dump(), "max_length": cfg.max_length},
                    {"data": data[1], "weak": weak[1], "strong": strong[1]},
                    lambda s: _score(cfg, data[0], weak[0], strong[0], s))


def _run_stages(cfg: WMSSConfig, wf: Workflow) -> dict:
    shared = shared_inputs(cfg, wf)
    (data, data_hash), heldout = shared["data"], shared["heldout"]
    (base, base_hash), (strong, strong_hash), (weak, weak_hash) = shared["base"], shared["strong"], shared["weak"]
    models = {"base": (base, base_hash), "strong": (strong, strong_hash)}

    # Phases 2 and 3, K rounds: in round k+1 the weak model is round k's input strong model
    round_weak, round_strong = (weak, weak_hash), (strong, strong_hash)
    chosen_rounds = []
    for k in range(1, cfg.rounds + 1):
        pair = {"data": data_hash, "weak": round_weak[1], "strong": round_strong[1]}
        scored = score_stage(cfg, wf, k, (data, data_hash), round_weak, round_strong)
        chosen = wf.stage(f"r{k}.select", {"ceda": cfg.ceda.model_dump()}, {"scores": scored["hash"]},
                          lambda s: _select(cfg, scored["scores"], s))
        trained = wf.stage(f"r{k}.jtws", {"jtws": cfg.jtws.model_dump(), "max_length": cfg.max_length},
                           {**pair, "active": chosen["hash"]},
                           lambda s: _jtws(cfg, data, round_weak[0], round_strong[0], chosen["active"], s))
        chosen_rounds.append(chosen)
        round_weak, round_strong = round_strong, (trained["model"], trained["hash"])
    models["wmss"] = round_strong
    first_active = chosen_rounds[0]

    # equal-budget baselines: one more epoch from M_strong (and the two ablations)
    b = cfg.baselines
    for method in b.methods:
        inputs = {"data": data_hash, "strong": strong_hash}
        if method == "jtws-only":  # joint training on all the data, no curriculum
            done = wf.stage(f"baseline.{method}", {"jtws": cfg.jtws.model_dump(), "max_length": cfg.max_length},
                            {**inputs, "weak": weak_hash},
                            lambda s: _jtws(cfg, data, weak, strong, None, s))
        else:
            noise = {"neftune": {"neftune_alpha": b.neftune_alpha}, "undial": {"undial_sigma": b.undial_sigma}}.get(method, {})
            opts = _train_options(cfg, cfg.sft, **noise)
            active = first_active["active"] if method == "ceda-only" else None  # SFT on the active set
            if active:
                inputs["active"] = first_active["hash"]
            done = wf.stage(f"baseline.{method}", {"training": opts.model_dump()}, inputs,
                            lambda s, opts=opts, active=active: _sft(cfg, data, strong, opts, s, active))
        models[method] = (done["model"], done["hash"])

    # evaluate every method's model on the same problems
    results = {}
    methods = list(dict.fromkeys([*cfg.eval.methods, *b.methods]))  # the config checked every name
    for method in methods:
        path, model_hash = models[method]
        evaluated = wf.stage(f"eval.{method}", {"eval": cfg.eval.model_dump(exclude={"methods"})},
                             {"model": model_hash, "heldout": data_hash if heldout else ""},
                             lambda s, path=path: _evaluate(cfg, path, heldout, s),
                             tags={"wmss.method": method})
        results[method] = {bench: s.get("accuracy") for bench, s in evaluated["summary"].items()}
    return results


def format_results(results: dict) -> str:
    """methods x benchmarks accuracy table, with the delta of each method vs SFT where SFT was run."""
    benches = sorted({b for r in results.values() for b in r})
    head = f"{'method':<10}" + "".join(f"{b:>14}" for b in benches)
    lines = [head, "-" * len(head)]
    for method, accs in results.items():
        cells = []
        for b in benches:
            acc = accs.get(b)
            ref = results.get("sft", {}).get(b)
            delta = f" ({100 * (acc - ref):+.1f})" if acc is not None and ref is not None and method != "sft" else ""
            cells.append(f"{'-' if acc is None else f'{100 * acc:.1f}'}{delta}".rjust(14))
        lines.append(f"{method:<10}" + "".join(cells))
    return "\n".join(lines)


def add_run_arguments(parser) -> None:
    add_config_source_arguments(parser)
    parser.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<name>)")


def run_cli(args) -> int:
    """`wmss run`: validate the config (before any Ray resources), run or resume, print the results."""
    from wmss.config import load_config

    cfg = load_config(args.config, args.overrides)
    target = run_location(cfg, args.run_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    results = run_workflow(cfg, target)
    print(f"\n[wmss] results (accuracy %, delta vs sft) — run dir {target}, {time.time() - start:.0f} s")
    print(format_results(results))
    return 0
