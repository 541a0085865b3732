"""Where a training stage's time goes on CPU, and the product's SFT step against a plain torch loop.

On the demo's Phase 1 (its base model, data and `sft` settings; `--n-train` more problems for longer
stages), in one run:

- `plain`: a plain torch loop in this process (the HF model, `torch.optim.AdamW`, the plan's micro-batches
  in the plan's order, one optimizer step per plan step, HF's own cross-entropy): the baseline;
- `stage`: the product's stage as `wmss run` runs it (`wmss.training.train` on Ray Train + DeepSpeed, Ray
  already up), timed from the call to the kept model on disk; its loop reports `train_s`, the time inside
  optimizer steps (rows, forward, backward, step).

Reports per size: the stage's wall time, its training time, the share that is not training (start-up of
the Ray Train worker group and its imports, model load, DeepSpeed init, export, copy-out), and tokens/s of
the product's steps / the plain loop's (same tokens, same batches). Appends to
benchmarks/results/train_overhead.json.

    python benchmarks/train_overhead.py                   # the demo's 192 problems, then 4x as many
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

RESULTS = Path(__file__).parent / "results" / "train_overhead.json"


def demo_inputs(root: Path, n_train: int):
    """The demo's base model and `n_train` training problems, made as `wmss run` makes them."""
    from wmss.config import load_config
    from workflows.wmss_pipeline import _demo_base, _demo_data

    cfg = load_config("demo")
    cfg = cfg.model_copy(update={"demo": cfg.demo.model_copy(update={"n_train": n_train})})
    if not (root / "base" / "model").exists():
        (root / "base").mkdir(parents=True, exist_ok=True)
        _demo_base(cfg, SimpleNamespace(dir=root / "base"))
    data = root / f"data{n_train}"
    data.mkdir(exist_ok=True)
    _demo_data(cfg, SimpleNamespace(dir=data))
    return cfg, str(root / "base" / "model"), str(data / "train.jsonl")


def plain_loop(model_dir: str, job, table) -> dict:
    """The baseline: the plan's micro-batches through the HF model and AdamW, nothing else."""
    import torch

    from wmss.models import load_causal_lm, load_tokenizer
    from wmss.plan import collate
    from wmss.train_loop import group_steps

    opts = job.options
    torch.manual_seed(opts["seed"])
    pad = load_tokenizer(model_dir).pad_token_id
    model = load_causal_lm(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts["lr"], betas=tuple(opts["adam_betas"]))
    batches = ({n: c.to_pylist() for n, c in zip(b.schema.names, b.columns)} for b in table.to_batches(256))
    train_s, tokens = 0.0, 0
    for step, micro_rows in group_steps(batches, 0, 0):
        t0 = time.perf_counter()
        for micro in sorted(micro_rows):
            ids, mask, labels = collate(micro_rows[micro], pad)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     reduction="sum") / max(job.step_tokens[step], 1)
            loss.backward()
            tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
    return {"train_s": train_s, "tokens": tokens}


def measure(root: Path, n_train: int) -> dict:
    from wmss.training import prepare, sft_heads, train
    from wmss.workflow import train_options

    cfg, base, data = demo_inputs(root, n_train)
    options = train_options(cfg, cfg.sft)
    job, tables, _ = prepare(sft_heads(base), name="sft", data=data, options=options)
    plain = plain_loop(base, job, tables["train"])
    out = root / f"stage{n_train}" / "model"
    t0 = time.perf_counter()
    train(sft_heads(base), name="sft", data=data, out=out, options=options)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "training.json").read_text())["metrics"]
    return {"n_train": n_train, "steps": len(job.n_micro), "tokens": plain["tokens"],
            "stage_wall_s": round(wall, 2), "stage_train_s": round(metrics["train_s"], 2),
            "non_training_share": round(1 - metrics["train_s"] / wall, 3),
            "plain_train_s": round(plain["train_s"], 2),
            "tokens_per_s_ratio": round(plain["train_s"] / metrics["train_s"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, nargs="+", default=[192, 768])
    args = parser.parse_args()
    import ray

    from wmss.raycluster import ensure_ray

    ensure_ray(None, num_cpus=4)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wmss-bench-") as d:
        for n in args.n_train:
            rows.append(measure(Path(d), n))
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    print(f"{'problems':>8} {'steps':>5} {'stage s':>8} {'train s':>8} {'not training':>12} {'product/plain tok/s':>19}")
    for r in rows:
        print(f"{r['n_train']:>8} {r['steps']:>5} {r['stage_wall_s']:>8.1f} {r['stage_train_s']:>8.1f} "
              f"{r['non_training_share']:>12.0%} {r['tokens_per_s_ratio']:>19.2f}")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    results.append({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
                    f"{__import__('os').cpu_count()} CPUs", "rows": rows})
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
