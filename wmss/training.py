"""The training stage on Ray Train: tokenise and plan on the driver, start a TorchTrainer whose workers
run `wmss.train_loop.train_loop`, copy the kept model out; and the `wmss sft` / `wmss jtws` commands.

What a step computes is the objective (`wmss.objective`: a list of weighted models, SFT one, JTWS two), the
schedule is the plan (`wmss.plan`), the per-worker loop is `wmss.train_loop`; this module is the Ray
adapter: `RayTrainSession` serves the loop its rows, checkpoints and reports through `ray.train`.

Exact resume: the plan is a pure function of the data, the seed and the worker count, so a resumed run
recomputes it and continues at the first step after its checkpoint; noise (NEFTune/UNDIAL) is drawn from a
generator seeded by (seed, step, rank, micro), so it does not depend on where a run was resumed either.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from wmss.config import TrainingConfig, given_flags, stage_config, with_flags, yaml_value
from wmss.errors import ConfigError, InputError, WmssError, no_space_left
from wmss.plan import build_plan
from wmss.train_loop import FINAL_MODEL_DIR, plan_rows, plan_table, train_loop, validation_rows, write_table


def sft_heads(model) -> list[dict]:
    """The one-model mix of SFT (and its NEFTune/UNDIAL baselines)."""
    return [{"model": str(model), "weight": 1.0, "trainable": True}]


@dataclass
class TrainJob:
    """Everything a worker needs, as plain data (it travels to every Ray Train worker)."""

    mode: str  # the stage's name in logs and metrics: "sft", "jtws", ...
    tokenizer: str
    options: dict
    heads: list[dict]  # [{model, weight, trainable}], the kept model last
    n_micro: list[int]
    step_tokens: list[int]
    mlflow: dict | None = None
    val_every: int | None = None  # None: no "val" dataset; 0: validate at the end only
    localizer: dict | None = None  # wmss.storage.Localizer's fields: models of an object-store run directory
    tables: dict | None = None  # "train" (the plan) and "val": where every worker reads them (path or URI)


class RayTrainSession:
    """`wmss.train_loop.WorkerSession` on a Ray Train worker: its own rows of the plan, streamed from the
    stage's storage (a path every node sees, or the object-store URI), checkpoints and metrics through
    `ray.train.report`."""

    def __init__(self, tables: dict):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.tables = tables

    def device(self):
        import ray.train.torch
        import torch

        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # DeepSpeed, zero.Init and NCCL use the current device: this worker's GPU
        return device

    def step_rows(self, start_step: int):
        return plan_rows(self.tables["train"], self.rank, start_step)

    def val_rows(self, batch_rows: int):
        return validation_rows(self.tables["val"], batch_rows)

    @contextlib.contextmanager
    def last_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def progress(self, total: int, done: int):
        if self.rank != 0:
            return None
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=total, desc="steps")
        bar.update(done)
        return bar


def ray_train_worker(job: dict) -> None:
    """What every Ray Train worker runs: the models of an object-store run directory are fetched into this
    node's mirror once, here at the stage boundary, then the plain loop runs."""
    from wmss.storage import Localizer, localize

    localizer = Localizer(**job["localizer"]) if job["localizer"] else None
    job = {**job, "tokenizer": localize(localizer, job["tokenizer"]),
           "heads": [{**h, "model": localize(localizer, h["model"])} for h in job["heads"]]}
    train_loop(job, RayTrainSession(job["tables"]))


def check_model_dir(path, flag: str) -> Path:
    """A model folder must exist and hold a config.json; say which flag was wrong otherwise."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{flag} {path}: not a model folder (no config.json there)")
    return path


def load_active_set(path) -> dict[str, int]:
    """id -> copies, from an active.parquet written by `wmss select`."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--active {path}: no such file")
    table = pq.read_table(path)
    missing = {"id", "count"} - set(table.column_names)
    if missing:
        raise InputError(f"--active {path}: missing column(s) {sorted(missing)}; expected id, weight, count")
    ids, counts = table.column("id").to_pylist(), table.column("count").to_pylist()
    if not ids:
        raise InputError(f"--active {path}: the active set is empty; nothing to train on")
    bad = [(i, c) for i, c in zip(ids, counts) if c is None or c < 1]
    if bad:
        raise InputError(f"--active {path}: id {bad[0][0]!r} has count {bad[0][1]!r}; counts must be >= 1")
    return {str(i): int(c) for i, c in zip(ids, counts)}


def prepare(heads: list[dict], *, name: str, data, options: TrainingConfig, active: dict[str, int] | None = None,
            on_bad_record: str = "error", validation=None, val_every: int = 0, mlflow_info: dict | None = None,
            localizer=None):
    """The driver's half of a training stage, launcher-independent: tokenise, plan, and build the job.
    Returns (job, {"train": plan table, "val": validation table}, number of samples)."""
    import pyarrow as pa

    from wmss.data import load_records, records_from_rows, tokenize_records
    from wmss.models import load_tokenizer

    tokenizer_dir = heads[-1]["model"]
    tokenizer = load_tokenizer(tokenizer_dir)

    def tokenized(source):
        if isinstance(source, (str, os.PathLike)):
            records, _ = load_records(source, on_bad_record=on_bad_record)
        else:
            records, _ = records_from_rows(source, "<rows>", on_bad_record=on_bad_record)
        return tokenize_records(records, tokenizer, options.max_length)

    if options.max_length is None:
        raise ConfigError(f"{name}: training.max_length is not set")
    if len(heads) > 1 and (options.neftune_alpha or options.undial_sigma):
        raise ConfigError(f"{name}: neftune_alpha / undial_sigma are options of single-model SFT, not of a mix of "
                          f"{len(heads)} models")
    samples, n_cut = tokenized(data)
    if active is not None:
        known = {s["id"] for s in samples}
        unknown = sorted(set(active) - known)
        if unknown:
            raise InputError(f"the active set names {len(unknown)} id(s) not in the data {data}, e.g. {unknown[:3]}")
        samples = [s for s in samples for _ in range(active.get(s["id"], 0))]
    if not samples:
        raise InputError(f"{name}: no samples to train on in {data}")
    plan = build_plan([len(s["input_ids"]) for s in samples], [s["n_completion_tokens"] for s in samples],
                      world_size=options.workers, epochs=options.epochs, seed=options.seed,
                      global_batch=options.global_batch, global_batch_tokens=options.global_batch_tokens,
                      micro_batch_tokens=options.micro_batch_tokens)
    print(f"[wmss] {name}: {len(samples)} samples ({n_cut} truncated at {options.max_length} tokens), "
          f"{plan.n_steps} optimizer steps on {options.workers} worker(s)", flush=True)
    job = TrainJob(mode=name, tokenizer=str(tokenizer_dir), options=options.model_dump(), heads=heads,
                   n_micro=plan.n_micro, step_tokens=plan.step_tokens, mlflow=mlflow_info,
                   val_every=val_every if validation is not None else None,
                   localizer=asdict(localizer) if localizer else None)
    tables = {"train": plan_table(plan, samples)}
    if validation is not None:
        val_samples, _ = tokenized(validation)
        tables["val"] = pa.table({"input_ids": [s["input_ids"] for s in val_samples],
                                  "labels": [s["labels"] for s in val_samples]})
    return job, tables, len(samples)


_RESUME_NEUTRAL = ("max_failures", "keep_checkpoints", "cpus_per_worker")  # raising them on a rerun changes no result


def _resume_record(heads, data, options: TrainingConfig, active, on_bad_record, validation, val_every):
    """(settings, input fingerprints) of a training run, as `wmss.resume.guard_resume` compares them: what
    decides its steps and weights, never where its files lie (a copied folder resumes)."""
    from wmss.workflow import _digest, fingerprint

    def identity(source):
        return fingerprint(str(source)) if isinstance(source, (str, os.PathLike)) else _digest(source)

    training = {k: v for k, v in options.model_dump().items() if k not in _RESUME_NEUTRAL}
    settings = {"training": training, "on_bad_record": on_bad_record,
                "heads": {str(i): {"weight": h["weight"], "trainable": h["trainable"]} for i, h in enumerate(heads)},
                "val_every": val_every if validation is not None else None}
    inputs = {"data": identity(data), **{f"heads.{i}.model": identity(h["model"]) for i, h in enumerate(heads)}}
    if active is not None:
        inputs["active set"] = _digest(active)
    if validation is not None:
        inputs["validation data"] = identity(validation)
    return settings, inputs


def train(heads: list[dict], *, name: str, data, out, options: TrainingConfig, active: dict[str, int] | None = None,
          ray_address: str | None = None, mlflow_info: dict | None = None, on_bad_record: str = "error",
          storage_path=None, validation=None, val_every: int = 0, callbacks: list | None = None,
          localizer=None) -> Path:
    """Train the mix `heads` ([{model, weight, trainable}], the kept model last: `sft_heads(model)` or
    `JTWSConfig.heads(weak, strong)`) on Ray Train and write the kept model as a plain HF checkpoint to `out`
    (atomically). `name` names the stage in logs and metrics. Resumes from the last checkpoint under
    `storage_path/<out name>.checkpoints` when one exists and was made with the same settings and inputs
    (else ConfigError, before Ray: see wmss.resume); `storage_path` (default: the folder of `out`) may
    be an object-store URI such as s3://bucket/run/stages/sft. Returns `out`.

    `validation` (records path or rows, formatted like `data`): the kept model's mean token CE on it is
    reported as `val_loss` every `val_every` optimizer steps (0: only at the end) and in the final metrics.
    `callbacks` are Ray Train callbacks (e.g. Tune's TuneReportCallback inside a Tune trial). `localizer`
    (wmss.storage.Localizer) lets workers on other nodes fetch models that lie in an object-store run
    directory's local mirror."""
    from wmss.io import atomic_path, write_json

    out = Path(out).resolve()
    job, tables, n_samples = prepare(heads, name=name, data=data, options=options, active=active,
                                     on_bad_record=on_bad_record, validation=validation, val_every=val_every,
                                     mlflow_info=mlflow_info, localizer=localizer)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from wmss.raycluster import ensure_ray
    from wmss.resume import guard_resume
    from wmss.storage import filesystem, is_uri, list_names

    storage = str(storage_path) if storage_path and is_uri(storage_path) else str(Path(storage_path or out.parent).resolve())
    checkpoints = f"{storage}/{out.name}.checkpoints"
    # same RunConfig: Ray Train restores the latest checkpoint; only those made with these settings and inputs
    if guard_resume(checkpoints, *_resume_record(heads, data, options, active, on_bad_record, validation, val_every),
                    has_state=any(n.startswith("checkpoint_") for n in list_names(checkpoints)), what=name,
                    start_over=f"delete {checkpoints} or pass another --out"):
        print(f"[wmss] {name}: resuming from the latest checkpoint in {checkpoints} (settings and inputs match the "
              "checkpoints')", flush=True)
    # the plan beside the checkpoints, where every worker reads its own rows: a local path every worker sees
    # (one node, or a shared filesystem, as Ray Train's checkpoints need too), or the object-store URI
    job.tables = {key: f"{storage}/{out.name}.plan/{key}.parquet" for key in tables}
    for key, table in tables.items():
        write_table(job.tables[key], table)
    ensure_ray(ray_address)
    # an object-store URI goes to Ray Train as (filesystem, path): fsspec-only protocols work too
    storage_fs, storage_in_fs = filesystem(storage) if is_uri(storage) else (None, storage)
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker, **({"GPU": options.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        ray_train_worker,
        train_loop_config=asdict(job),
        scaling_config=ScalingConfig(num_workers=options.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{out.name}.checkpoints", storage_path=storage_in_fs, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=options.keep_checkpoints),
            failure_config=FailureConfig(max_failures=options.max_failures), callbacks=callbacks),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # a full disk shows as a worker's error inside Ray's, a traceback deep
        if no_space_left(err) is None:
            raise
        raise WmssError(f"{name}: no space left on the device of {checkpoints}, where its checkpoints go; free "
                        "space there, then rerun: the stage resumes from its last checkpoint") from err
    if result.checkpoint is None:
        raise RuntimeError(f"{name} finished without a final checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        final = Path(d) / FINAL_MODEL_DIR
        if not final.exists():
            raise RuntimeError(f"{name}: the last checkpoint {result.checkpoint.path} holds no final model")
        with atomic_path(out) as tmp:
            shutil.copytree(final, tmp)
    write_json(out / "training.json", {"mode": name, "steps": len(job.n_micro), "samples": n_samples,
                                       "metrics": result.metrics})
    return out


def train_plain(heads: list[dict], *, name: str, data, root, options: TrainingConfig, **prepare_kwargs) -> Path:
    """The same stage without Ray: plan on this process, then `wmss.train_loop.run_plain` under plain
    torch.distributed (this process must be one of the job's ranks: torchrun, or one process with RANK=0,
    WORLD_SIZE=1, MASTER_ADDR, MASTER_PORT). Returns the kept model's folder (the last checkpoint's)."""
    import torch.distributed as dist

    from wmss.train_loop import init_distributed, run_plain, shutdown_distributed

    root = Path(root)
    job, tables, _ = prepare(heads, name=name, data=data, options=options, **prepare_kwargs)
    started = init_distributed()
    try:
        if dist.get_rank() == 0:
            for key, table in tables.items():
                write_table(str(root / f"{key}.parquet"), table)
        dist.barrier()
        run_plain(asdict(job), root / "train.parquet", root / "checkpoints",
                  val_path=root / "val.parquet" if "val" in tables else None)
    finally:
        if started:
            shutdown_distributed()
    last = sorted((root / "checkpoints").glob("checkpoint_*"))[-1]
    return last / FINAL_MODEL_DIR


# -------------------------------------------------------------------------------------------- the CLI
#
# `wmss sft|jtws [CONFIG] [--set k=v ...] [flags]`: the settings are the config's section (`sft`, or
# `jtws.training` and `jtws`) with --set applied, then the flags; every training flag is made from
# TrainingConfig's fields, so names, defaults and checks live in the schema alone. Without CONFIG, the
# schema's defaults (not the demo's).

_FLAG_ALIASES = {"neftune_alpha": ("--neftune",), "undial_sigma": ("--undial",)}  # the SFT baselines' short names


def _add_training_flags(parser: argparse.ArgumentParser, section: str) -> None:
    from wmss.config import add_config_source_arguments, add_schema_flags

    add_config_source_arguments(parser, "the built-in defaults, not the demo's")
    parser.add_argument("--data", required=True, help="training records (.jsonl/.json/.parquet/HF dataset dir or id)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the final HF checkpoint")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), help="default: the config's data.on_bad_record")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: the config's ray.address, else a local one)")
    add_schema_flags(parser.add_argument_group(f"training settings (each overrides the config's {section})"),
                     TrainingConfig, aliases=_FLAG_ALIASES, exclusive=("global_batch", "global_batch_tokens"))


def _training_options(args, cfg, section: TrainingConfig) -> TrainingConfig:
    """The section, then the flags given; max_length falls back to the workflow's."""
    from wmss.workflow import train_options

    given = given_flags(args)
    for one, other in (("global_batch", "global_batch_tokens"), ("global_batch_tokens", "global_batch")):
        if one in given:  # a batch size given on the command line replaces the config's, whichever kind
            given.setdefault(other, None)
    return train_options(cfg, with_flags(section, given))


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="base model folder (HF checkpoint)")
    _add_training_flags(parser, "sft section")


def run_sft(args) -> int:
    cfg = stage_config(args.config, args.overrides)
    options = _training_options(args, cfg, cfg.sft)
    model = check_model_dir(args.model, "--model")
    train(sft_heads(model), name="sft", data=args.data, out=args.out, options=options,
          ray_address=args.ray_address or cfg.ray.address, on_bad_record=args.on_bad_record or cfg.data.on_bad_record)
    print(f"[wmss] sft: wrote {args.out}")
    return 0


def add_jtws_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weak", required=True, type=Path, help="weak model folder")
    parser.add_argument("--strong", required=True, type=Path, help="strong model folder")
    parser.add_argument("--active", type=Path, help="active.parquet from `wmss select` (default: all data)")
    parser.add_argument("--lam", type=yaml_value, default=argparse.SUPPRESS,
                        help="weight of the strong logits, in [0, 1] (default: the config's jtws.lam)")
    parser.add_argument("--freeze-weak", action="store_true", default=argparse.SUPPRESS, help="train the strong model only")
    _add_training_flags(parser, "jtws.training section")


def run_jtws(args) -> int:
    cfg = stage_config(args.config, args.overrides)
    options = _training_options(args, cfg, cfg.jtws.training)
    given = {k: getattr(args, k) for k in ("lam", "freeze_weak") if hasattr(args, k)}
    jtws = with_flags(cfg.jtws, given)
    weak, strong = check_model_dir(args.weak, "--weak"), check_model_dir(args.strong, "--strong")
    active = load_active_set(args.active) if args.active else None
    train(jtws.heads(weak, strong), name="jtws", data=args.data, out=args.out, options=options, active=active,
          ray_address=args.ray_address or cfg.ray.address, on_bad_record=args.on_bad_record or cfg.data.on_bad_record)
    print(f"[wmss] jtws: wrote the strong model to {args.out}")
    return 0
