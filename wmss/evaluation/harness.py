"""`evaluate`: prompts for every problem of the chosen benchmarks, responses from a Ray Data generation
job, grades, the gold solutions' NLL where problems carry one, per-sample predictions and per-benchmark
summaries, logged to MLflow.

Output folder:
  predictions/<benchmark>.jsonl  one line per sample: id, sample, prompt, response, extracted, gold,
                                 correct, truncated, response_tokens
  summary.json                   {"settings": ..., "benchmarks": {name: summary}}
  mlflow.db                      only when no MLflow run is given or active and MLFLOW_TRACKING_URI is unset
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

from wmss.data import Record
from wmss.evaluation.benchmarks import (BENCHMARKS, Problem, default_max_new_tokens, load_benchmark,
                                        problem_record, problems_from_rows)
from wmss.evaluation.grading import grade
from wmss.errors import ConfigError, InputError
from wmss.io import atomic_path, write_json

log = logging.getLogger(__name__)

SEED = 42  # the paper's decoding seed; sample s of a problem uses SEED + s


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al., 2021), computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(predictions: list[dict], samples: int) -> dict:
    """Accuracy (mean over all samples), pass@1 and pass@`samples` (unbiased, averaged over problems),
    truncation rate and mean response length in tokens of one benchmark's predictions."""
    by_problem: dict[str, list[bool]] = {}
    for p in predictions:
        by_problem.setdefault(p["id"], []).append(p["correct"])
    summary = {
        "n_problems": len(by_problem),
        "samples_per_problem": samples,
        "accuracy": sum(p["correct"] for p in predictions) / len(predictions),
        "truncation_rate": sum(p["truncated"] for p in predictions) / len(predictions),
        "mean_response_tokens": sum(p["response_tokens"] for p in predictions) / len(predictions),
    }
    for k in sorted({1, samples}):
        summary[f"pass_at_{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in by_problem.values()) / len(by_problem)
    return summary


def gold_nll(model, tokenizer, records: list[Record], *, batch_size: int = 16, max_length: int | None = None,
             enable_thinking: bool | None = None) -> dict:
    """{"nll": mean negative log-likelihood (nats/token) of the records' completions under `model`,
    "nll_tokens": how many tokens it averages over}: the tokens training supervises (`wmss.data` formatting,
    the end-of-turn token included), every token weighing the same. One forward per `batch_size` records,
    right-padded; the cross-entropy is float32 from the final hidden states, never a (B, T, V) logits tensor.
    A record longer than `max_length` is cut from the right, as training cuts it."""
    import torch

    from wmss.data import tokenize_records
    from wmss.losses import linear_cross_entropy, predicting_rows
    from wmss.models import final_hidden, output_weight
    from wmss.plan import collate

    rows, _ = tokenize_records(records, tokenizer, max_length, enable_thinking=enable_thinking)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    weight = output_weight(model).float()
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, mask, labels = (t.to(weight.device) for t in collate(rows[start:start + batch_size], pad_id))
            rows_mask, targets = predicting_rows(labels)
            hidden = final_hidden(model, ids, mask)[rows_mask].float()
            # reduction "none": the chunked float32 path on every device (the fused CUDA kernel may use TF32)
            total += linear_cross_entropy(hidden, weight, targets, reduction="none").double().sum().item()
            n_tokens += targets.numel()
    return {"nll": total / n_tokens, "nll_tokens": n_tokens}


def _gold_records(problems: dict[str, list[Problem]],
                  extra_benchmarks: dict[str, list[dict]] | None) -> dict[str, list[Record]]:
    """Per benchmark with gold worked solutions, the chat records of its problems with the solution as the
    assistant turn. Only extra benchmarks' rows keep one (a non-empty "solution" string; problem i is row i,
    as `problems_from_rows` keeps the order); a named benchmark's Problem holds just the final answer."""
    records = {}
    for name, rows in (extra_benchmarks or {}).items():
        solved = [replace(problem_record(name, problem), completion=row["solution"])
                  for problem, row in zip(problems[name], rows)
                  if isinstance(row.get("solution"), str) and row["solution"].strip()]
        if solved:
            records[name] = solved
    return records


def _benchmark_nll(model_dir, tokenizer, records: dict[str, list[Record]], *, max_length: int,
                   enable_thinking: bool | None, localizer) -> dict[str, dict]:
    """`gold_nll` per benchmark of `records`, with the evaluated model loaded once in float32 in this
    process (on CUDA when there is one, its memory handed back after); no model is loaded without records."""
    if not records:
        return {}
    import torch

    from wmss.models import load_causal_lm
    from wmss.storage import localize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(localize(localizer, model_dir), device=device).eval()
    try:
        return {name: gold_nll(model, tokenizer, bench_records, max_length=max_length,
                               enable_thinking=enable_thinking) for name, bench_records in records.items()}
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _log_to_mlflow(summaries: dict[str, dict], settings: dict, out_dir: Path, mlflow_run=None) -> None:
    """Metrics `eval/<benchmark>/<name>` (what `wmss compare` reads) to `mlflow_run` (a
    `wmss.tracking.StageRun`) if given, else to the active MLflow run if there is one, else to a new run
    (with the settings as params) in experiment "wmss eval" of the store `wmss.tracking` resolves
    (MLFLOW_TRACKING_URI, default a SQLite file in `out_dir`)."""
    import mlflow

    from wmss.tracking import Tracker, resolve_tracking_uri

    metrics = {f"eval/{name}/{key}": float(value) for name, summary in summaries.items()
               for key, value in summary.items()}
    if mlflow_run is not None:
        mlflow_run.log_metrics(metrics)
    elif mlflow.active_run() is not None:
        mlflow.log_metrics(metrics)
    else:
        tracker = Tracker(resolve_tracking_uri(None, out_dir), "wmss eval", f"eval {Path(settings['model']).name}")
        tracker.log_params(settings)
        tracker.log_metrics(metrics)
        tracker.finish()


def _request_key(benchmark: str, problem_id: str, sample: int) -> str:
    return json.dumps([benchmark, problem_id, sample])


def _load_problems(benchmarks: list[str], data_dir, limit: int | None,
                   extra_benchmarks: dict[str, list[dict]] | None) -> dict[str, list[Problem]]:
    extra = extra_benchmarks or {}
    clash = sorted(set(extra) & set(BENCHMARKS))
    if clash:
        raise ConfigError(f"extra benchmarks {clash} would shadow built-in benchmarks; rename them")
    unknown = [name for name in benchmarks if name not in BENCHMARKS and name not in extra]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}"
                         + (f"; extra: {', '.join(extra)}" if extra else ""))
    names = list(dict.fromkeys([*benchmarks, *extra]))  # given order, extras last, no repeats
    problems = {}
    for name in names:
        if name in extra:
            rows = ((f"row {i}", row) for i, row in enumerate(extra[name]))
            problems[name] = problems_from_rows(rows, f"extra benchmark {name!r}", name)[:limit]
            if not problems[name]:
                raise InputError(f"extra benchmark {name!r} has no rows")
        else:
            problems[name] = load_benchmark(name, data_dir, limit)
    return problems


def evaluate(model_dir, benchmarks: list[str], out_dir, *, data_dir=None, limit=None, backend="hf", samples=1,
             temperature=0.0, max_new_tokens=None, extra_benchmarks: dict[str, list[dict]] | None = None,
             ray_address=None, enable_thinking: bool | None = None, mlflow_run=None,
             localizer=None) -> dict[str, dict]:
    """Generate `samples` responses per problem of each benchmark (and of each `extra_benchmarks` entry:
    rows with question/instruction + answer, graded as math) with `backend`, grade them, write
    predictions and summary.json to `out_dir`, log the metrics to MLflow, and return the summary per
    benchmark (see `summarize`).

    Benchmarks whose problems carry a gold worked solution (extra rows with a "solution", such as the demo's
    held-out split; the named benchmarks keep only final answers) also get `nll` and `nll_tokens`: the
    per-token negative log-likelihood of the solutions as the assistant turn of the evaluation prompt,
    over the tokens training supervises (`gold_nll`), a finer signal than accuracy for small models. It
    runs in this process, the model in float32 (on CUDA when there is one), after generation.

    Decoding follows the paper: greedy at temperature 0 (top-p 1, seed 42), the benchmark's budget of new
    tokens unless `max_new_tokens` overrides it (capped by the model's context), the chat template with
    the benchmark kind's system prompt; `enable_thinking` switches Qwen3's thinking mode (None: the
    template's default). Joins Ray through `wmss.raycluster.ensure_ray` (the connected cluster, else
    `ray_address`, else a local one) and leaves it running for the caller's next stage. Metrics go to `mlflow_run` (the workflow's eval stage, a
    `wmss.tracking.StageRun`), else to the active MLflow run, else to a new run (`_log_to_mlflow`)."""
    from transformers import AutoConfig

    from wmss.data import format_example
    # generation imports torch: loaded here, so the config's benchmark check can read BENCHMARKS cheaply
    from wmss.evaluation.generation import BACKENDS, GenerationRequest, finish_response, generate, stop_token_ids
    from wmss.models import load_tokenizer
    from wmss.raycluster import ensure_ray

    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if samples > 1 and temperature == 0:
        raise ConfigError(f"samples={samples} with temperature 0 gives {samples} identical greedy responses; "
                         "set a temperature > 0 for pass@k")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    out_dir = Path(out_dir)
    problems = _load_problems(list(benchmarks), data_dir, limit, extra_benchmarks)
    tokenizer = load_tokenizer(model_dir)
    context = AutoConfig.from_pretrained(str(model_dir)).max_position_embeddings
    stop_ids = stop_token_ids(model_dir, tokenizer)

    requests, prompts = [], {}
    for name, bench_problems in problems.items():
        budget = max_new_tokens or default_max_new_tokens(name)
        for problem in bench_problems:
            prompt_ids = format_example(problem_record(name, problem), tokenizer,
                                        enable_thinking=enable_thinking).input_ids
            if len(prompt_ids) >= context:
                raise InputError(f"benchmark {name!r}, problem {problem.id!r}: the prompt has {len(prompt_ids)} "
                                 f"tokens, the model's whole context is {context}")
            prompts[(name, problem.id)] = prompt_ids
            for sample in range(samples):
                requests.append(GenerationRequest(_request_key(name, problem.id, sample), prompt_ids,
                                                  min(budget, context - len(prompt_ids)), SEED + sample))
    max_model_len = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)

    ensure_ray(ray_address)
    generated = generate(model_dir, requests, backend=backend, temperature=temperature, stop_ids=stop_ids,
                         max_model_len=max_model_len, localizer=localizer)

    nll = _benchmark_nll(model_dir, tokenizer, _gold_records(problems, extra_benchmarks), max_length=context,
                         enable_thinking=enable_thinking, localizer=localizer)
    budgets = {r.key: r.max_new_tokens for r in requests}
    summaries = {}
    for name, bench_problems in problems.items():
        predictions = []
        for problem in bench_problems:
            prompt = tokenizer.decode(prompts[(name, problem.id)])
            for sample in range(samples):
                key = _request_key(name, problem.id, sample)
                response_ids, truncated = finish_response(generated[key], stop_ids, budgets[key])
                response = tokenizer.decode(response_ids, skip_special_tokens=True)
                result = grade(response, problem.answer, name, problem.options)
                predictions.append({
                    "id": problem.id, "sample": sample, "prompt": prompt, "response": response,
                    "extracted": result.extracted, "gold": problem.answer, "correct": result.correct,
                    "truncated": truncated, "response_tokens": len(response_ids)})
        _write_jsonl(out_dir / "predictions" / f"{name}.jsonl", predictions)
        summaries[name] = {**summarize(predictions, samples), **nll.get(name, {})}
        log.info("%s: %s", name, summaries[name])

    settings = {"model": str(model_dir), "backend": backend, "samples": samples, "temperature": temperature,
                "max_new_tokens": max_new_tokens, "limit": limit, "enable_thinking": enable_thinking,
                "data_dir": None if data_dir is None else str(data_dir)}
    write_json(out_dir / "summary.json", {"settings": settings, "benchmarks": summaries})
    _log_to_mlflow(summaries, settings, out_dir, mlflow_run)
    return summaries
