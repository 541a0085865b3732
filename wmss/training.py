"""SFT and JTWS training: one per-worker loop on Ray Train (V2) with a DeepSpeed engine inside.

Layout, top to bottom:
- the batch plan (pure): which sample goes to which optimizer step, worker and micro-batch;
- the loss module DeepSpeed wraps (SFT: linear CE of one model; JTWS: mixed CE of the pair);
- `train_loop_per_worker`, the loop every Ray Train worker runs;
- `train`, the driver side: tokenise, plan, start the TorchTrainer, copy the final model out;
- the `wmss sft` / `wmss jtws` commands.

Exact resume: the plan is a pure function of the data, the seed and the worker count, so a resumed run
recomputes it and continues at the first step after its checkpoint; noise (NEFTune/UNDIAL) is drawn from a
generator seeded by (seed, step, rank, micro), so it does not depend on where a run was resumed either.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wmss.config import JTWSConfig, TrainingConfig, format_validation_error
from wmss.losses import IGNORE_INDEX, linear_cross_entropy, mixed_cross_entropy, mixing_diagnostics, predicting_rows

FINAL_MODEL_DIR = "hf_model"  # inside the last Ray Train checkpoint: the finished plain HF checkpoint
DS_TAG = "ds"


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """The whole training schedule. `sample[i]` (an index into the tokenised samples) runs in optimizer
    step `step[i]`, on worker `rank[i]`, in micro-batch `micro[i]`; every worker runs `n_micro[s]`
    micro-batches in step s (some possibly empty, so collective ops stay in lock-step), and step s holds
    `step_tokens[s]` supervised tokens over all workers."""

    sample: np.ndarray
    step: np.ndarray
    rank: np.ndarray
    micro: np.ndarray
    n_micro: list[int]
    step_tokens: list[int]

    @property
    def n_steps(self) -> int:
        return len(self.n_micro)


def build_plan(lengths, supervised, *, world_size: int, epochs: int, seed: int, global_batch: int | None,
               global_batch_tokens: int | None, micro_batch_tokens: int) -> Plan:
    """Shuffle the samples per epoch (seeded), cut them into optimizer steps of `global_batch` samples (or
    at least `global_batch_tokens` supervised tokens), balance each step over the workers by length
    (longest first to the least loaded worker) and pack each worker's share, longest first, into
    micro-batches of at most `micro_batch_tokens` padded tokens (a longer sample gets a micro-batch alone)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    supervised = np.asarray(supervised, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("no samples to train on")
    order = np.concatenate([np.random.default_rng([seed, epoch]).permutation(lengths.size) for epoch in range(epochs)])
    steps: list[list[int]] = [[]]
    tokens = 0
    for i in order:
        steps[-1].append(int(i))
        tokens += int(supervised[i])
        full = len(steps[-1]) >= global_batch if global_batch else tokens >= global_batch_tokens
        if full:
            steps.append([])
            tokens = 0
    if not steps[-1]:
        steps.pop()
    cols: dict[str, list[int]] = {"sample": [], "step": [], "rank": [], "micro": []}
    n_micro, step_tokens = [], []
    for s, members in enumerate(steps):
        load = [0] * world_size
        shares: list[list[int]] = [[] for _ in range(world_size)]
        for i in sorted(members, key=lambda i: (-lengths[i], i)):
            r = min(range(world_size), key=lambda r: (load[r], r))
            shares[r].append(i)
            load[r] += int(lengths[i])
        most = 0
        for r, share in enumerate(shares):
            micro, longest, rows = 0, 0, 0
            for i in share:  # already longest first
                longest_if = max(longest, int(lengths[i]))
                if rows and longest_if * (rows + 1) > micro_batch_tokens:
                    micro, longest, rows = micro + 1, 0, 0
                    longest_if = int(lengths[i])
                longest, rows = longest_if, rows + 1
                for key, value in (("sample", i), ("step", s), ("rank", r), ("micro", micro)):
                    cols[key].append(value)
            most = max(most, micro + 1 if share else 0)
        n_micro.append(max(most, 1))
        step_tokens.append(int(supervised[members].sum()))
    return Plan(**{k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}, n_micro=n_micro, step_tokens=step_tokens)


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total`: linear warm-up
    over the first `warmup_ratio` of the steps, then cosine or linear decay to `min_ratio` (or constant)."""
    warmup = int(math.ceil(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def collate(rows: list[dict], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) tensors of one micro-batch."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        mask[b, :n] = 1
    return ids, mask, labels


# ------------------------------------------------------------------------------------------ the loss


def _loss_module_class():
    import torch

    from wmss.losses import neftune_noise, undial_target_noise
    from wmss.models import final_hidden, output_weight

    class TrainingLoss(torch.nn.Module):
        """What DeepSpeed wraps: the model (SFT) or the weak/strong pair (JTWS) plus the loss, so the
        output-layer weights are used inside this module's forward (ZeRO-3 gathers them there: they are
        registered as external parameters)."""

        def __init__(self, model, *, lam: float | None, zero3: bool):
            super().__init__()
            self.model, self.lam = model, lam
            if zero3:
                import deepspeed

                for weight in self._weights():
                    deepspeed.zero.register_external_parameter(self, weight)

        def _weights(self):
            return self.model.output_weights() if self.lam is not None else (output_weight(self.model),)

        def forward(self, input_ids, attention_mask, labels, scale: float, noise_seed: int,
                    neftune_alpha: float | None = None, undial_sigma: float | None = None, diagnose: bool = False,
                    strong_only: bool = False):
            rows_mask, targets = predicting_rows(labels)
            gen = torch.Generator(device=input_ids.device).manual_seed(noise_seed)
            if strong_only:  # validation: the CE of the model that is kept (JTWS: the strong one) alone
                model = self.model.strong if self.lam is not None else self.model
                hidden = final_hidden(model, input_ids, attention_mask)[rows_mask]
                loss = linear_cross_entropy(hidden, self._weights()[-1], targets, reduction="sum")
                return loss.detach(), loss, {}
            if self.lam is not None:
                h_weak, h_strong = self.model(input_ids, attention_mask)
                w_weak, w_strong = self._weights()
                h_weak, h_strong = h_weak[rows_mask], h_strong[rows_mask]
                loss = mixed_cross_entropy(h_weak, w_weak, h_strong, w_strong, targets, self.lam, reduction="sum")
            else:
                embeds = None
                if neftune_alpha:
                    embeds = neftune_noise(self.model.get_input_embeddings()(input_ids), neftune_alpha,
                                           attention_mask, generator=gen)
                hidden = final_hidden(self.model, input_ids, attention_mask, inputs_embeds=embeds)[rows_mask]
                (w_strong,) = self._weights()
                offset = None
                if undial_sigma:
                    lengths = attention_mask.sum(dim=1, keepdim=True).expand_as(rows_mask)[rows_mask]
                    offset = undial_target_noise(targets, lengths, undial_sigma, generator=gen)
                loss = linear_cross_entropy(hidden, w_strong, targets, reduction="sum", target_offset=offset)
                h_weak = h_strong = hidden
                w_weak = w_strong
            stats = {}
            if diagnose:
                stats = mixing_diagnostics(h_weak.detach(), w_weak.detach(), h_strong.detach(), w_strong.detach(),
                                           targets, 1.0 if self.lam is None else self.lam)
            return loss.detach(), loss * scale, stats

    return TrainingLoss


# ------------------------------------------------------------------------------------ the worker loop


def _deepspeed_config(opts: TrainingConfig, use_gpu: bool) -> dict:
    bf16 = opts.bf16 if opts.bf16 is not None else use_gpu
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # our micro-batches vary in size: accumulate locally, one engine.step() per optimizer step
        "managed_gradient_accumulation": False,
        "gradient_clipping": opts.grad_clip,
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": {"stage": opts.zero, "overlap_comm": False,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "optimizer": {"type": "AdamW", "params": {"lr": opts.lr, "betas": list(opts.adam_betas),
                                                   "weight_decay": opts.weight_decay, "torch_adam": not use_gpu}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _step_groups(shard, rank: int, start_step: int):
    """Yield (step, {micro: [rows]}) for this worker's rows, in plan order, from the (unsplit, ordered)
    dataset every worker reads; steps before `start_step` (already trained) are skipped."""
    current, groups = None, {}
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
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


def _rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def train_loop_per_worker(job: dict) -> None:
    """Runs on every Ray Train worker. `job` is `TrainJob` as a dict."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed
    import ray.train

    from wmss.models import WeakStrongPair, load_causal_lm, load_tokenizer
    from wmss.storage import Localizer, localize

    localizer = Localizer(**job["localizer"]) if job["localizer"] else None
    job = {**job, **{k: localize(localizer, job[k]) for k in ("tokenizer", "model", "weak", "strong")}}
    opts = TrainingConfig(**job["options"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available() and opts.gpus_per_worker > 0
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    torch.manual_seed(opts.seed)
    jtws = job["mode"] == "jtws"
    tokenizer = load_tokenizer(job["tokenizer"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if jtws:
        cfg = JTWSConfig(**job["jtws"])
        model = WeakStrongPair(load_causal_lm(job["weak"]), load_causal_lm(job["strong"]), freeze_weak=cfg.freeze_weak)
        lam = cfg.lam
    else:
        model, lam = load_causal_lm(job["model"]), None
    module = _loss_module_class()(model, lam=lam, zero3=opts.zero == 3)
    # what carries optimizer state (a frozen weak model carries none); read before ZeRO-3 partitions it
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = len(job["n_micro"])
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=_deepspeed_config(opts, use_gpu),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, opts.warmup_ratio, opts.lr_schedule, opts.min_lr_ratio)))

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            if (Path(d) / FINAL_MODEL_DIR).exists():  # finished earlier; only the copy-out was missing
                ray.train.report({"step": total, "final": 1}, checkpoint=checkpoint if rank == 0 else None)
                return
            _, client_state = engine.load_checkpoint(d, tag=DS_TAG)
            start_step = int(client_state["step"])
            rng_file = Path(d) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                _set_rng_state(torch.load(rng_file, weights_only=False))
        if rank == 0:
            print(f"[wmss] resumed from step {start_step}/{total}", flush=True)

    logger = _MetricLogger(job.get("mlflow"), prefix=job["mode"]) if rank == 0 else None
    val_every = job["val_every"] or 0  # None: no validation set; 0: validate at the end only
    bar = None
    if rank == 0:
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=total, desc=f"{job['mode']} steps")
        bar.update(start_step)
    groups = _step_groups(ray.train.get_dataset_shard("train"), rank, start_step)
    pending = next(groups, None)
    metrics: dict = {}
    for step in range(start_step, total):
        t0 = time.perf_counter()
        micro_rows: dict = {}
        if pending is not None and pending[0] == step:
            micro_rows = pending[1]
            pending = next(groups, None)
        scale = world / max(job["step_tokens"][step], 1)  # DeepSpeed averages over workers
        sums = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens seen
        stats = {}
        for micro in range(job["n_micro"][step]):
            rows = micro_rows.get(micro) or [{"input_ids": [pad_id, pad_id], "labels": [IGNORE_INDEX] * 2}]
            ids, mask, labels = (t.to(device) for t in collate(rows, pad_id))
            loss_sum, loss, micro_stats = engine(
                ids, mask, labels, scale, noise_seed=hash((opts.seed, step, rank, micro)) & 0x7FFFFFFF,
                neftune_alpha=opts.neftune_alpha, undial_sigma=opts.undial_sigma, diagnose=(micro == 0 and rank == 0))
            engine.backward(loss)
            stats = stats or micro_stats
            sums += torch.tensor([float(loss_sum), float(mask.sum()) if micro in micro_rows else 0.0], dtype=torch.float64)
        lr = engine.get_lr()[0]
        engine.step()
        torch.distributed.all_reduce(sums)
        elapsed = time.perf_counter() - t0
        grad_norm = engine.get_global_grad_norm()
        metrics = {"loss": float(sums[0]) / max(job["step_tokens"][step], 1), "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "tokens_per_s": float(sums[1]) / elapsed, **stats}
        if logger is not None:
            logger.log(metrics, step + 1)
            bar.update(1)
        done = step + 1
        validate = val_every and done % val_every == 0 and done < total
        if validate:
            metrics["val_loss"] = _validation_loss(engine, device, pad_id)
            if logger is not None:
                logger.log({"val_loss": metrics["val_loss"]}, done)
        if opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < total:
            with tempfile.TemporaryDirectory(prefix="wmss-ckpt-") as d:
                engine.save_checkpoint(d, tag=DS_TAG, client_state={"step": done})
                torch.save(_rng_state(), Path(d) / f"rng_rank{rank}.pt")
                ray.train.report({"step": done, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(d))
        elif validate:  # a report without a checkpoint: what Tune's scheduler (ASHA) decides on
            ray.train.report({"step": done, **metrics}, checkpoint=None)
    if job["val_every"] is not None:
        metrics["val_loss"] = _validation_loss(engine, device, pad_id)
        if logger is not None:
            logger.log({"val_loss": metrics["val_loss"]}, total)
    _report_final_model(engine, module, job, tokenizer, rank,
                        {"step": total, "final": 1, "trainable_params": trainable, **metrics})
    if bar is not None:
        bar.close()


def _validation_loss(engine, device, pad_id: int, batch_rows: int = 8) -> float:
    """Mean token cross-entropy of the kept model (JTWS: the strong one alone) on the "val" dataset. Every
    worker evaluates every row: the forwards stay in lock-step, which ZeRO-3's parameter gathering needs."""
    import ray.train
    import torch

    sums = torch.zeros(2, dtype=torch.float64)  # loss sum, supervised tokens
    engine.eval()
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=batch_rows, batch_format="numpy"):
            rows = [{"input_ids": i, "labels": l} for i, l in zip(batch["input_ids"], batch["labels"])]
            ids, mask, labels = (t.to(device) for t in collate(rows, pad_id))
            loss_sum, _, _ = engine(ids, mask, labels, 1.0, noise_seed=0, strong_only=True)
            sums += torch.tensor([float(loss_sum), float((labels[:, 1:] != IGNORE_INDEX).sum())], dtype=torch.float64)
    engine.train()
    return float(sums[0] / max(float(sums[1]), 1.0))


def _report_final_model(engine, module, job: dict, tokenizer, rank: int, metrics: dict) -> None:
    """Gather the trained weights (ZeRO-3: consolidated from every worker) and report a checkpoint that
    holds the plain HF model (the strong model only, for JTWS)."""
    import ray.train

    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; the full dict lands on rank 0
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    prefix = "model.strong." if job["mode"] == "jtws" else "model."
    target = module.model.strong if job["mode"] == "jtws" else module.model
    hf_state = {k[len(prefix):]: v.detach().cpu().float() for k, v in state.items() if k.startswith(prefix)}
    with tempfile.TemporaryDirectory(prefix="wmss-final-") as d:
        from wmss.models import save_model

        save_model(target, tokenizer, Path(d) / FINAL_MODEL_DIR, state_dict=hf_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class _MetricLogger:
    """Rank 0's per-step metrics: to the stage's MLflow run when the driver opened one, and a line to the
    log every `every` steps."""

    def __init__(self, mlflow_info: dict | None, prefix: str, every: int = 10):
        self.client = self.run_id = None
        self.prefix, self.every = prefix, every
        if mlflow_info:
            import mlflow

            self.client = mlflow.MlflowClient(tracking_uri=mlflow_info["tracking_uri"])
            self.run_id = mlflow_info["run_id"]

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(f"train/{k}", v, now, step) for k, v in clean.items()])
        if step == 1 or step % self.every == 0:
            print(f"[wmss] {self.prefix} step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in clean.items()), flush=True)


# ------------------------------------------------------------------------------------------ the driver


@dataclass
class TrainJob:
    """Everything a worker needs, as plain data (it travels to every Ray Train worker)."""

    mode: str  # "sft" | "jtws"
    tokenizer: str
    options: dict
    n_micro: list[int]
    step_tokens: list[int]
    model: str | None = None
    weak: str | None = None
    strong: str | None = None
    jtws: dict | None = None
    mlflow: dict | None = None
    val_every: int | None = None  # None: no "val" dataset; 0: validate at the end only
    localizer: dict | None = None  # wmss.storage.Localizer's fields: models of an object-store run directory


def check_model_dir(path, flag: str) -> Path:
    """A model folder must exist and hold a config.json; say which flag was wrong otherwise."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SystemExit(f"{flag} {path}: not a model folder (no config.json there)")
    return path


def load_active_set(path) -> dict[str, int]:
    """id -> copies, from an active.parquet written by `wmss select`."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--active {path}: no such file")
    table = pq.read_table(path)
    missing = {"id", "count"} - set(table.column_names)
    if missing:
        raise SystemExit(f"--active {path}: missing column(s) {sorted(missing)}; expected id, weight, count")
    ids, counts = table.column("id").to_pylist(), table.column("count").to_pylist()
    if not ids:
        raise SystemExit(f"--active {path}: the active set is empty; nothing to train on")
    bad = [(i, c) for i, c in zip(ids, counts) if c is None or c < 1]
    if bad:
        raise SystemExit(f"--active {path}: id {bad[0][0]!r} has count {bad[0][1]!r}; counts must be >= 1")
    return {str(i): int(c) for i, c in zip(ids, counts)}


def train(mode: str, *, data, out, options: TrainingConfig, model=None, weak=None, strong=None,
          jtws: JTWSConfig | None = None, active: dict[str, int] | None = None, ray_address: str | None = None,
          mlflow_info: dict | None = None, on_bad_record: str = "error", storage_path=None, validation=None,
          val_every: int = 0, callbacks: list | None = None, localizer=None) -> Path:
    """Train and write the final plain HF checkpoint to `out` (atomically). Resumes from the last
    checkpoint under `storage_path/<out name>.checkpoints` when one exists; `storage_path` (default: the
    folder of `out`) may be an object-store URI such as s3://bucket/run/stages/sft. Returns `out`.

    `validation` (records path or rows, formatted like `data`): the kept model's mean token CE on it is
    reported as `val_loss` every `val_every` optimizer steps (0: only at the end) and in the final metrics.
    `callbacks` are Ray Train callbacks (e.g. Tune's TuneReportCallback inside a Tune trial). `localizer`
    (wmss.storage.Localizer) lets workers on other nodes fetch models that lie in an object-store run
    directory's local mirror."""
    import pyarrow as pa

    from wmss.data import load_records, records_from_rows, tokenize_records
    from wmss.io import atomic_path

    out = Path(out).resolve()
    tokenizer_dir = strong if mode == "jtws" else model
    from wmss.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)

    def tokenized(source):
        if isinstance(source, (str, os.PathLike)):
            records, _ = load_records(source, on_bad_record=on_bad_record)
        else:
            records, _ = records_from_rows(source, "<rows>", on_bad_record=on_bad_record)
        return tokenize_records(records, tokenizer, options.max_length)

    if options.max_length is None:
        raise ValueError("training.max_length is not set")
    samples, n_cut = tokenized(data)
    if active is not None:
        known = {s["id"] for s in samples}
        unknown = sorted(set(active) - known)
        if unknown:
            raise SystemExit(f"the active set names {len(unknown)} id(s) not in the data, e.g. {unknown[:3]}")
        samples = [s for s in samples for _ in range(active.get(s["id"], 0))]
    if not samples:
        raise SystemExit("no samples to train on")
    plan = build_plan([len(s["input_ids"]) for s in samples], [s["n_completion_tokens"] for s in samples],
                      world_size=options.workers, epochs=options.epochs, seed=options.seed,
                      global_batch=options.global_batch, global_batch_tokens=options.global_batch_tokens,
                      micro_batch_tokens=options.micro_batch_tokens)
    print(f"[wmss] {mode}: {len(samples)} samples ({n_cut} truncated at {options.max_length} tokens), "
          f"{plan.n_steps} optimizer steps on {options.workers} worker(s)", flush=True)
    order = np.lexsort((plan.micro, plan.rank, plan.step))
    table = pa.table({
        "step": plan.step[order], "rank": plan.rank[order], "micro": plan.micro[order],
        "input_ids": [samples[i]["input_ids"] for i in plan.sample[order]],
        "labels": [samples[i]["labels"] for i in plan.sample[order]],
    })
    job = TrainJob(mode=mode, tokenizer=str(tokenizer_dir), options=options.model_dump(), n_micro=plan.n_micro,
                   step_tokens=plan.step_tokens, model=str(model) if model else None,
                   weak=str(weak) if weak else None, strong=str(strong) if strong else None,
                   jtws=jtws.model_dump() if jtws else None, mlflow=mlflow_info,
                   val_every=val_every if validation is not None else None,
                   localizer=asdict(localizer) if localizer else None)
    datasets = {"train": table}
    if validation is not None:
        val_samples, _ = tokenized(validation)
        datasets["val"] = pa.table({"input_ids": [s["input_ids"] for s in val_samples],
                                    "labels": [s["labels"] for s in val_samples]})

    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from wmss.raycluster import ensure_ray

    ensure_ray(ray_address)
    from wmss.storage import filesystem, is_uri, list_names

    storage = str(storage_path) if storage_path and is_uri(storage_path) else str(Path(storage_path or out.parent).resolve())
    checkpoints = f"{storage}/{out.name}.checkpoints"
    if any(name.startswith("checkpoint_") for name in list_names(checkpoints)):  # same RunConfig: Ray Train restores
        print(f"[wmss] {mode}: resuming from the latest checkpoint in {checkpoints}", flush=True)
    # an object-store URI goes to Ray Train as (filesystem, path): fsspec-only protocols work too
    storage_fs, storage_in_fs = filesystem(storage) if is_uri(storage) else (None, storage)
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker, **({"GPU": options.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        scaling_config=ScalingConfig(num_workers=options.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{out.name}.checkpoints", storage_path=storage_in_fs, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=options.keep_checkpoints),
            failure_config=FailureConfig(max_failures=options.max_failures), callbacks=callbacks),
        datasets={name: ray.data.from_arrow(t) for name, t in datasets.items()},
        # every worker reads the whole (small: token ids only) plan-ordered table and keeps its own rows,
        # so the data order is exactly the plan's and a resume continues at the next unseen sample
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    data_context = ray.data.DataContext.get_current()
    bars, data_context.enable_progress_bars = data_context.enable_progress_bars, False  # the step bar says enough
    try:
        result = trainer.fit()
    finally:
        data_context.enable_progress_bars = bars
    if result.checkpoint is None:
        raise RuntimeError(f"{mode} finished without a final checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        final = Path(d) / FINAL_MODEL_DIR
        if not final.exists():
            raise RuntimeError(f"{mode}: the last checkpoint {result.checkpoint.path} holds no final model")
        with atomic_path(out) as tmp:
            shutil.copytree(final, tmp)
    (out / "training.json").write_text(json.dumps(
        {"mode": mode, "steps": plan.n_steps, "samples": len(samples), "metrics": result.metrics}, indent=2, default=str))
    return out


# -------------------------------------------------------------------------------------------- the CLI


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    d = TrainingConfig()
    parser.add_argument("--data", required=True, help="training records (.jsonl/.json/.parquet/HF dataset dir or id)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the final HF checkpoint")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker)
    parser.add_argument("--zero", type=int, default=d.zero, help="DeepSpeed ZeRO stage 0-3")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--global-batch", type=int, help=f"samples per optimizer step (default {d.global_batch})")
    batch.add_argument("--global-batch-tokens", type=int, help="supervised tokens per optimizer step")
    parser.add_argument("--micro-batch-tokens", type=int, default=d.micro_batch_tokens)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps; 0 = end only")
    parser.add_argument("--max-failures", type=int, default=d.max_failures)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start or join a local one)")


def _training_config(args) -> TrainingConfig:
    from pydantic import ValidationError

    fields = dict(epochs=args.epochs, lr=args.lr, max_length=args.max_length, workers=args.workers,
                  gpus_per_worker=args.gpus_per_worker, zero=args.zero, micro_batch_tokens=args.micro_batch_tokens,
                  checkpoint_every=args.checkpoint_every, max_failures=args.max_failures, seed=args.seed,
                  neftune_alpha=getattr(args, "neftune", None), undial_sigma=getattr(args, "undial", None))
    if args.global_batch is not None:
        fields["global_batch"] = args.global_batch
    if args.global_batch_tokens is not None:
        fields["global_batch_tokens"] = args.global_batch_tokens
    try:
        return TrainingConfig(**fields)
    except ValidationError as err:
        raise SystemExit(format_validation_error(err, "flags").replace("_", "-"))


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="base model folder (HF checkpoint)")
    _add_training_flags(parser)
    parser.add_argument("--neftune", type=float, metavar="ALPHA", help="NEFTune embedding noise (paper: 5)")
    parser.add_argument("--undial", type=float, metavar="SIGMA", help="UNDIAL target-logit noise (paper: 1.0)")


def run_sft(args) -> int:
    options = _training_config(args)
    model = check_model_dir(args.model, "--model")
    train("sft", data=args.data, out=args.out, options=options, model=model, ray_address=args.ray_address,
          on_bad_record=args.on_bad_record)
    print(f"[wmss] sft: wrote {args.out}")
    return 0


def add_jtws_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weak", required=True, type=Path, help="weak model folder")
    parser.add_argument("--strong", required=True, type=Path, help="strong model folder")
    parser.add_argument("--active", type=Path, help="active.parquet from `wmss select` (default: all data)")
    parser.add_argument("--lam", type=float, default=JTWSConfig().lam, help="weight of the strong logits, in [0, 1]")
    parser.add_argument("--freeze-weak", action="store_true", help="train the strong model only")
    _add_training_flags(parser)


def run_jtws(args) -> int:
    from pydantic import ValidationError

    options = _training_config(args)
    try:
        jtws = JTWSConfig(lam=args.lam, freeze_weak=args.freeze_weak)
    except ValidationError as err:
        raise SystemExit(format_validation_error(err, "flags"))
    weak, strong = check_model_dir(args.weak, "--weak"), check_model_dir(args.strong, "--strong")
    active = load_active_set(args.active) if args.active else None
    train("jtws", data=args.data, out=args.out, options=options, weak=weak, strong=strong, jtws=jtws,
          active=active, ray_address=args.ray_address, on_bad_record=args.on_bad_record)
    print(f"[wmss] jtws: wrote the strong model to {args.out}")
    return 0
