"""The per-worker training loop: one plain function, `train_loop(job, session)`, that Ray Train calls on
every worker (`wmss.training`) and that also runs under plain `torch.distributed` without Ray
(`run_plain`: env:// initialisation, e.g. under torchrun, or one process on one GPU in the GPU check).

What a worker does: load the models of the mix directly in the training dtype (ZeRO-3: constructed
partitioned, never a full copy per worker), turn on activation checkpointing, wrap the objective in a
DeepSpeed engine, restore the last checkpoint, run its share of the plan step by step (every collective on
the training device), checkpoint, validate, and export the kept model in the dtype it trained in.

`session` is where the loop meets its launcher: rank and device, this worker's rows of the plan, the
validation rows, the last checkpoint, and where reports and checkpoints go. This module imports neither
Ray nor MLflow at load time (the GPU check machine has neither)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from wmss.config import TrainingConfig
from wmss.losses import IGNORE_INDEX
from wmss.plan import collate, lr_factor

FINAL_MODEL_DIR = "hf_model"  # inside the last checkpoint: the finished plain HF checkpoint
DS_TAG = "ds"
MAX_SHARD_SIZE = "5GB"  # safetensors shards of the exported model (transformers' and vLLM's loaders read them)


class WorkerSession(Protocol):
    """What the loop needs from whoever launched it (Ray Train or plain torch.distributed)."""

    rank: int
    world_size: int

    def device(self): ...

    def step_rows(self, start_step: int) -> Iterator[tuple[int, dict[int, list[dict]]]]:
        """(step, {micro: rows}) for this worker's rows in plan order, from `start_step` on."""

    def val_rows(self, batch_rows: int) -> Iterator[list[dict]] | None:
        """Batches of validation rows (every worker gets every row), or None without a validation set."""

    def last_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A context giving the folder of the last checkpoint, or None."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Metrics of a step; with `checkpoint_dir`, this worker's files of a checkpoint (every worker calls
        it with its own folder; the launcher merges them)."""

    def progress(self, total: int, done: int):
        """A progress bar (rank 0) or None."""


# --------------------------------------------------------------------------------------- set-up


def train_dtype(opts: TrainingConfig, use_gpu: bool):
    """bf16 where configured (default: on GPUs), else float32."""
    import torch

    bf16 = opts.bf16 if opts.bf16 is not None else use_gpu
    return torch.bfloat16 if bf16 else torch.float32


def gradient_checkpointing(opts: TrainingConfig, use_gpu: bool) -> bool:
    """Activation checkpointing where configured (default: on GPUs, where activations dominate memory)."""
    return opts.gradient_checkpointing if opts.gradient_checkpointing is not None else use_gpu


def deepspeed_config(opts: TrainingConfig, use_gpu: bool, hidden_size: int) -> dict:
    """The DeepSpeed config of a training stage. On GPUs: communication overlapped with compute, ZeRO-3
    prefetch and bucket sizes from the (largest) hidden size, as transformers' "auto" values derive them;
    with bf16 weights, gradients accumulate in float32 over the micro-batches (ZeRO 1-3)."""
    import torch

    bf16 = train_dtype(opts, use_gpu) == torch.bfloat16
    plain = opts.zero == 0 and not bf16  # the engine's optimizer is the torch one: the loop clips (see _clip_hook)
    zero: dict = {"stage": opts.zero, "overlap_comm": use_gpu, "contiguous_gradients": True,
                  "stage3_gather_16bit_weights_on_model_save": True}
    if opts.zero == 3:
        zero.update(reduce_bucket_size=hidden_size * hidden_size,
                    stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                    stage3_param_persistence_threshold=10 * hidden_size)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # our micro-batches vary in size: accumulate locally, one engine.step() per optimizer step
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0 if plain else opts.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": opts.lr, "betas": list(opts.adam_betas),
                                                   "weight_decay": opts.weight_decay, "torch_adam": not use_gpu}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16 and opts.zero >= 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def load_models(paths: list[str], dtype, ds_config: dict):
    """The models of the mix in `dtype`. Under ZeRO-3 they are constructed partitioned (transformers calls
    deepspeed.zero.Init while an HfDeepSpeedConfig is alive), so no worker holds a full copy; the returned
    handle keeps that config alive for the loop's lifetime."""
    from wmss.models import load_causal_lm

    handle = None
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        handle = HfDeepSpeedConfig(ds_config)
    return [load_causal_lm(p, dtype=dtype) for p in paths], handle


def hidden_size(path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return int(getattr(config.get_text_config(), "hidden_size"))


def _rng_state() -> dict:
    """This process's RNG states as tensors only, so a checkpoint is read back with `weights_only=True`
    (a pickle from checkpoint storage would run whatever code it names)."""
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python_version": torch.tensor(version), "python_internal": torch.tensor(internal, dtype=torch.int64),
             "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": torch.tensor([pos, has_gauss], dtype=torch.int64),
             "numpy_gauss": torch.tensor(cached, dtype=torch.float64), "torch": torch.get_rng_state()}
    if gauss is not None:
        state["python_gauss"] = torch.tensor(gauss, dtype=torch.float64)
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    gauss = float(state["python_gauss"]) if "python_gauss" in state else None
    random.setstate((int(state["python_version"]), tuple(state["python_internal"].tolist()), gauss))
    pos, has_gauss = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitioned parameters keep their full size there


# ------------------------------------------------------------------------------------------ the loop


def train_loop(job: dict, session: WorkerSession) -> None:
    """Train the mix `job["heads"]` ([{model, weight, trainable}], the last one kept) over the plan that
    `session` serves, and report the final checkpoint holding the kept model as a plain HF folder."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed

    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (C++, OpenMP) at its first
        # initialize: 30-75 s on a fresh 2-core machine, for collectives of a few MB that gloo does at once.
        # DeepSpeed keeps this dict of usable ops for the process (edits persist); without the kernel it
        # uses torch.distributed (gloo), the same collectives.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from wmss.models import load_tokenizer
    from wmss.objective import MixObjective

    opts = TrainingConfig(**job["options"])
    rank = session.rank
    device = session.device()
    use_gpu = device.type == "cuda"
    torch.manual_seed(opts.seed)
    tokenizer = load_tokenizer(job["tokenizer"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    heads = job["heads"]
    paths = [h["model"] for h in heads]
    ds_config = deepspeed_config(opts, use_gpu, max(hidden_size(p) for p in paths))
    models, _zero3_handle = load_models(paths, train_dtype(opts, use_gpu), ds_config)
    if gradient_checkpointing(opts, use_gpu):
        for model, head in zip(models, heads):
            if head["trainable"]:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = MixObjective(models, [h["weight"] for h in heads], trainable=[h["trainable"] for h in heads],
                          neftune_alpha=opts.neftune_alpha, undial_sigma=opts.undial_sigma,
                          label_smoothing=opts.label_smoothing,
                          zero3=opts.zero == 3, filter_eps=opts.loss_filter_eps)
    # what carries optimizer state (a frozen model carries none)
    trainable = sum(_numel(p) for p in module.parameters() if p.requires_grad)
    total = len(job["n_micro"])
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, opts.warmup_ratio, opts.lr_schedule, opts.min_lr_ratio)))

    clipped = _clip_hook(engine, module, opts.grad_clip)
    start_step = 0
    with session.last_checkpoint() as d:
        if d is not None:
            if (Path(d) / FINAL_MODEL_DIR).exists():  # finished earlier; only the copy-out was missing
                session.report({"step": total, "final": 1}, d if rank == 0 else None)
                return
            _, client_state = engine.load_checkpoint(d, tag=DS_TAG)
            start_step = int(client_state["step"])
            rng_file = Path(d) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                _set_rng_state(torch.load(rng_file, weights_only=True))
            if rank == 0:
                print(f"[wmss] resumed from step {start_step}/{total}", flush=True)

    logger = _MetricLogger(job.get("mlflow"), prefix=job["mode"]) if rank == 0 else None
    val_every = job["val_every"] or 0  # None: no validation set; 0: validate at the end only
    bar = session.progress(total, start_step)
    groups = session.step_rows(start_step)
    pending = next(groups, None)
    metrics: dict = {}
    train_s = 0.0  # time in optimizer steps (rows, forward, backward, step): the rest of a stage is set-up
    for step in range(start_step, total):
        t0 = time.perf_counter()
        micro_rows: dict = {}
        if pending is not None and pending[0] == step:
            micro_rows = pending[1]
            pending = next(groups, None)
        scale = session.world_size / max(job["step_tokens"][step], 1)  # DeepSpeed averages over workers
        # loss sum, tokens seen: on the training device, where the collective runs (NCCL has no CPU tensors)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        stats = {}
        for micro in range(job["n_micro"][step]):
            rows = micro_rows.get(micro) or [{"input_ids": [pad_id, pad_id], "labels": [IGNORE_INDEX] * 2}]
            ids, mask, labels = (t.to(device) for t in collate(rows, pad_id))
            loss_sum, loss, micro_stats = engine(
                ids, mask, labels, scale, noise_seed=hash((opts.seed, step, rank, micro)) & 0x7FFFFFFF,
                diagnose=(micro == 0 and rank == 0))
            engine.backward(loss)
            stats = stats or micro_stats
            sums[0] += loss_sum.double()
            if micro in micro_rows:
                sums[1] += mask.sum()
        lr = engine.get_lr()[0]
        torch.distributed.all_reduce(sums)
        sums = sums.tolist()
        _check_finite(job["mode"], step + 1, "loss", sums[0], "before the optimizer step: the weights are untouched")
        engine.step()
        elapsed = time.perf_counter() - t0
        train_s += elapsed
        grad_norm = engine.get_global_grad_norm()
        grad_norm = clipped.get("norm") if grad_norm is None else grad_norm
        if grad_norm is not None:
            _check_finite(job["mode"], step + 1, "gradient norm", float(grad_norm),
                          "the last checkpoint holds the weights before it")
        metrics = {"loss": sums[0] / max(job["step_tokens"][step], 1), "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "tokens_per_s": sums[1] / elapsed, **stats}
        if logger is not None:
            logger.log(metrics, step + 1)
        if bar is not None:
            bar.update(1)
        done = step + 1
        validate = val_every and done % val_every == 0 and done < total
        if validate:
            metrics["val_loss"] = _validation_loss(engine, session, device, pad_id)
            if logger is not None:
                logger.log({"val_loss": metrics["val_loss"]}, done)
        if opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < total:
            with tempfile.TemporaryDirectory(prefix="wmss-ckpt-") as d:
                engine.save_checkpoint(d, tag=DS_TAG, client_state={"step": done})
                torch.save(_rng_state(), Path(d) / f"rng_rank{rank}.pt")
                session.report({"step": done, **metrics}, d)
        elif validate:  # a report without a checkpoint: what Tune's scheduler (ASHA) decides on
            session.report({"step": done, **metrics}, None)
    if job["val_every"] is not None:
        metrics["val_loss"] = _validation_loss(engine, session, device, pad_id)
        if logger is not None:
            logger.log({"val_loss": metrics["val_loss"]}, total)
    _report_final_model(engine, module, tokenizer, session,
                        {"step": total, "final": 1, "trainable_params": trainable, **metrics, "train_s": train_s})
    if logger is not None and logger.run is not None:
        logger.run.flush()  # what a tracking-server outage kept back
    if bar is not None:
        bar.close()


def _clip_hook(engine, module, max_norm: float) -> dict:
    """Where DeepSpeed keeps no gradient norm (ZeRO-0 in fp32: its optimizer is torch's, and its clipping
    throws the norm away), clip in a hook that runs inside the optimizer step, after DeepSpeed's all-reduce:
    the returned dict's "norm" is then the step's total gradient norm before clipping. Elsewhere: {}."""
    import torch

    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled():
        return {}
    params = [p for p in module.parameters() if p.requires_grad]
    seen: dict = {}

    def clip(_optimizer, _args, _kwargs):
        seen["norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    engine.optimizer.register_step_pre_hook(clip)
    return seen


def _check_finite(stage: str, step: int, what: str, value: float, state: str) -> None:
    """Stop a stage at a NaN/inf instead of training on (and saving) garbage."""
    if not math.isfinite(value):
        from wmss.errors import NonFiniteError

        raise NonFiniteError(f"{stage}: step {step}: the {what} is {value}; training stopped ({state}). Lower the "
                               "learning rate or check the data, then rerun: the stage resumes from its last checkpoint")


def _validation_loss(engine, session: WorkerSession, device, pad_id: int, batch_rows: int = 8) -> float:
    """Mean token cross-entropy of the kept model alone on the validation rows. Every worker evaluates
    every row: the forwards stay in lock-step, which ZeRO-3's parameter gathering needs."""
    import torch

    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, supervised tokens
    engine.eval()
    with torch.no_grad():
        for rows in session.val_rows(batch_rows):
            ids, mask, labels = (t.to(device) for t in collate(rows, pad_id))
            loss_sum, _, _ = engine(ids, mask, labels, 1.0, noise_seed=0, kept_only=True)
            sums[0] += loss_sum.double()
            sums[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
    engine.train()
    loss, tokens = sums.tolist()
    return loss / max(tokens, 1.0)


def _report_final_model(engine, module, tokenizer, session: WorkerSession, metrics: dict) -> None:
    """Gather the trained weights (ZeRO-3: consolidated from every worker) and report a checkpoint holding
    the kept model as a plain HF folder, in the dtype it trained in, as sharded safetensors."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; the full dict lands on rank 0
    else:
        state = engine.module.state_dict() if session.rank == 0 else None
    if session.rank != 0:
        session.report(metrics, None)
        return
    prefix = f"models.{len(module.models) - 1}."
    hf_state = {k[len(prefix):]: v.detach().cpu() for k, v in state.items() if k.startswith(prefix)}
    with tempfile.TemporaryDirectory(prefix="wmss-final-") as d:
        from wmss.models import save_model

        save_model(module.kept, tokenizer, Path(d) / FINAL_MODEL_DIR, state_dict=hf_state, max_shard_size=MAX_SHARD_SIZE)
        session.report(metrics, d)


class _MetricLogger:
    """Rank 0's per-step metrics: to the stage's MLflow run when the driver opened one (a tracking server
    that goes away does not stop training: wmss.tracking.StageRun keeps them and sends them later, or
    drops them with a warning), and a line to the log every `every` steps."""

    def __init__(self, mlflow_info: dict | None, prefix: str, every: int = 10):
        self.run = None
        self.prefix, self.every = prefix, every
        if mlflow_info:
            from wmss.tracking import StageRun

            self.run = StageRun.in_worker(mlflow_info)

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if self.run is not None:
            self.run.log_metrics({f"train/{k}": v for k, v in clean.items()}, step)
        if step == 1 or step % self.every == 0:
            print(f"[wmss] {self.prefix} step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in clean.items()), flush=True)


# ------------------------------------------------------------------- plain torch.distributed (no Ray)


def plan_table(plan, samples: list[dict]):
    """The plan as one Arrow table in plan order (step, rank, micro), with each row's token ids and labels
    (int32): what the workers read their own rows from (`plan_rows`)."""
    import pyarrow as pa

    order = np.lexsort((plan.micro, plan.rank, plan.step))
    tokens = pa.list_(pa.int32())
    return pa.table({
        "step": plan.step[order], "rank": plan.rank[order], "micro": plan.micro[order],
        "input_ids": pa.array([samples[i]["input_ids"] for i in plan.sample[order]], type=tokens),
        "labels": pa.array([samples[i]["labels"] for i in plan.sample[order]], type=tokens),
    })


PLAN_ROW_GROUP = 4096  # rows per Parquet row group of a plan: a resumed worker skips whole groups of done steps


def write_table(location: str, table) -> None:
    """Write a plan (or validation) table as Parquet to a local path (atomically) or an object-store URI (one
    object, replaced whole)."""
    from wmss.storage import filesystem, is_uri

    if is_uri(location):
        import pyarrow.parquet as pq

        fs, path = filesystem(location)
        pq.write_table(table, path, filesystem=fs, row_group_size=PLAN_ROW_GROUP)
    else:
        from wmss.io import write_parquet

        write_parquet(location, table, row_group_size=PLAN_ROW_GROUP)


def _dataset(location: str):
    import pyarrow.dataset as ds

    from wmss.storage import filesystem, is_uri

    fs, path = filesystem(location) if is_uri(location) else (None, str(location))
    return ds.dataset(path, format="parquet", filesystem=fs)


def plan_rows(location: str, rank: int, start_step: int) -> Iterator[tuple[int, dict[int, list[dict]]]]:
    """(step, {micro: rows}) of `rank`'s rows of the plan at `location` (path or URI), from `start_step` on,
    streamed: only this worker's rows leave the file, a batch at a time, in plan order."""
    import pyarrow.dataset as ds

    scanner = _dataset(location).scanner(filter=(ds.field("rank") == rank) & (ds.field("step") >= start_step),
                                         batch_size=256, use_threads=False)  # one thread keeps the plan order
    batches = ({n: c.to_pylist() for n, c in zip(rb.schema.names, rb.columns)} for rb in scanner.to_batches())
    return group_steps(batches, rank, start_step)


def validation_rows(location: str, batch_rows: int) -> Iterator[list[dict]]:
    """Batches of `batch_rows` validation rows from the table at `location` (every worker reads them all)."""
    scanner = _dataset(location).scanner(columns=["input_ids", "labels"], batch_size=batch_rows, use_threads=False)
    for rb in scanner.to_batches():
        part = rb.to_pydict()
        yield [{"input_ids": i, "labels": l} for i, l in zip(part["input_ids"], part["labels"])]


def group_steps(batches, rank: int, start_step: int) -> Iterator[tuple[int, dict[int, list[dict]]]]:
    """(step, {micro: rows}) of `rank`'s rows, from plan-ordered column batches (dicts of arrays); steps
    before `start_step` (already trained) are skipped."""
    current, groups = None, {}
    for batch in batches:
        for j in range(len(batch["step"])):
            step = int(batch["step"][j])
            if step < start_step or int(batch["rank"][j]) != rank:
                continue
            if step != current:
                if current is not None:
                    yield current, groups
                current, groups = step, {}
            groups.setdefault(int(batch["micro"][j]), []).append(
                {"input_ids": batch["input_ids"][j], "labels": batch["labels"][j]})
    if current is not None:
        yield current, groups


class TorchDistSession:
    """A session under plain torch.distributed: the plan and validation rows from Parquet files (each worker
    reads only its own rank's rows), checkpoints as `checkpoint_NNNNNN` folders under `root` (staged, then
    renamed by rank 0 once every worker wrote its files: a crash never leaves a half checkpoint), metrics
    appended to `root/metrics.jsonl`. Folders must be on a filesystem every worker sees."""

    def __init__(self, plan_path, root, val_path=None):
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.plan_path, self.val_path, self.root = str(plan_path), val_path, Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.final_metrics: dict | None = None

    def device(self):
        import torch

        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def step_rows(self, start_step: int):
        return plan_rows(self.plan_path, self.rank, start_step)

    def val_rows(self, batch_rows: int):
        return validation_rows(self.val_path, batch_rows)

    @contextlib.contextmanager
    def last_checkpoint(self):
        done = sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir())
        yield str(done[-1]) if done else None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import torch.distributed as dist

        if "final" in metrics:
            self.final_metrics = metrics
        if self.rank == 0:
            with open(self.root / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics, default=float) + "\n")
        # every worker reports (with or without files), as under Ray Train; a checkpoint of ours reported
        # again (a finished run restarted) stays where it is
        new = checkpoint_dir is not None and Path(checkpoint_dir).resolve().parent != self.root.resolve()
        stage = self.root / f".staging_{int(metrics['step']):06d}"
        if new:
            shutil.copytree(checkpoint_dir, stage, dirs_exist_ok=True)
        has_files = _flag(new)
        dist.all_reduce(has_files)
        if int(has_files.item()) and self.rank == 0:
            final = self.root / f"checkpoint_{int(metrics['step']):06d}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(stage, final)
        dist.barrier()

    def progress(self, total: int, done: int):
        return None


def _flag(value: bool):
    """A one-element tensor on the device the process group's collectives run on."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return torch.tensor([int(value)], device=device)


def init_distributed() -> bool:
    """Join the env:// process group (variables set by torchrun, or RANK=0, WORLD_SIZE=1, MASTER_ADDR,
    MASTER_PORT for one process) unless this process is in one already: NCCL with CUDA, gloo otherwise.
    Returns whether it started one (and so should destroy it)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
    return True


def shutdown_distributed() -> None:
    """Leave the process group; through DeepSpeed when it joined it, so that it forgets the groups it
    cloned from this one (a later process group in this process would otherwise meet stale ones)."""
    import sys

    import torch.distributed as dist

    if "deepspeed" in sys.modules:
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
            return
    dist.destroy_process_group()


def run_plain(job: dict, plan_path, root, val_path=None) -> dict:
    """Run `train_loop` under plain torch.distributed (see `init_distributed`). Returns the final metrics;
    the kept model is in the last checkpoint's `hf_model` folder under `root`."""
    started = init_distributed()
    try:
        session = TorchDistSession(plan_path, root, val_path)
        train_loop(job, session)
        return session.final_metrics or {}
    finally:
        if started:
            shutdown_distributed()
