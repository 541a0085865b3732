"""`wmss eval`: evaluate a model on benchmarks (see `wmss.evaluation.harness.evaluate`)."""

from __future__ import annotations

import argparse

from wmss.evaluation.benchmarks import BENCHMARKS
from wmss.evaluation.generation import BACKENDS


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (or hub id) to evaluate")
    parser.add_argument("--benchmarks", required=True,
                        help=f"comma-separated benchmark names: {','.join(BENCHMARKS)}")
    parser.add_argument("--out", required=True, help="output folder: predictions/*.jsonl, summary.json")
    parser.add_argument("--data-dir", help="folder with local benchmark files <name>.json|.jsonl|.parquet "
                                           "(benchmarks without one load from the Hugging Face hub)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark")
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="generation backend (default: hf)")
    parser.add_argument("--samples", type=int, default=1, help="responses per problem, for pass@k (default: 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--max-new-tokens", type=int,
                        help="new-token budget for every benchmark (default: the paper's, 4096 or 8192)")
    parser.add_argument("--thinking", choices=("on", "off"),
                        help="Qwen3 chat templates: thinking mode on or off (default: the template's)")
    parser.add_argument("--ray-address", help="Ray cluster to use (default: a new local one)")


def run_eval(args: argparse.Namespace) -> int:
    from wmss.evaluation.harness import evaluate

    benchmarks = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    summaries = evaluate(args.model, benchmarks, args.out, data_dir=args.data_dir, limit=args.limit,
                         backend=args.backend, samples=args.samples, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, ray_address=args.ray_address,
                         enable_thinking=None if args.thinking is None else args.thinking == "on")
    k = args.samples
    print(f"{'benchmark':<12} {'problems':>8} {'accuracy':>9} {'pass@' + str(k):>8} {'truncated':>9} {'tokens':>8}")
    for name, s in summaries.items():
        print(f"{name:<12} {s['n_problems']:>8} {s['accuracy']:>9.3f} {s[f'pass_at_{k}']:>8.3f} "
              f"{s['truncation_rate']:>9.3f} {s['mean_response_tokens']:>8.1f}")
    print(f"predictions and summary.json in {args.out}")
    return 0
