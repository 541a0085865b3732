"""The batch plan (pure): which sample runs in which optimizer step, on which worker, in which micro-batch;
the learning-rate schedule; and the collation of one micro-batch.

Exact resume rests on this module: the plan is a pure function of the sample lengths, the seed and the
worker count, so a resumed run recomputes it and continues at the first step after its checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wmss.losses import IGNORE_INDEX


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
