"""GPU checks: the one script to run when a session is lent the GPU machine. That machine has torch,
transformers, pyarrow and numpy but no Ray, vLLM or MLflow; `bash benchmarks/gpu_carry.sh` packs what else
the checked code needs (DeepSpeed, pydantic, hjson, cut-cross-entropy) into `.gpu/`, ignored by git:

    # on the device machine, in the checkout (carry: [".gpu"])
    PYTHONPATH=.gpu/site:. python3 benchmarks/gpu_checks.py
    # here, at toy sizes (tests/test_benchmarks.py does, so the script cannot rot)
    python benchmarks/gpu_checks.py --small --device cpu

1. loss: the fused loss every GPU training path uses (`wmss.losses.mixture_cross_entropy`: cut-cross-
   entropy, gradient filter off) at Qwen3's vocabulary, one head (SFT) and two (JTWS), on random features
   and on peaked ones (target probability > 0.99, as late in SFT): loss and every gradient against a
   float64 full-logit reference of the same inputs; the share of non-target output rows whose gradient
   is exactly zero, with the filter off and with cut-cross-entropy's default ("high"); time and peak
   memory against a float32 full-logit computation.
2. scoring: the exact torch scorer (`wmss.scoring.score_batch`) on a bf16 model against float32 full
   softmax on a float32 copy, random Qwen3-0.6B-shaped weights: tokens/s and the largest entropy gap.
3. training: a few optimizer steps of the real per-worker loop (`wmss.train_loop.run_plain`: NCCL, world
   size 1, DeepSpeed ZeRO-3 with bf16 weights and fp32 gradient accumulation, activation checkpointing)
   for SFT and JTWS at Qwen3-0.6B and 1.7B shapes with random weights: peak GPU memory, tokens/s, and MFU
   (6 x trained parameters x tokens/s over --peak-tflops; checkpointing's recompute is not counted).

Prints one table, writes benchmarks/results/gpu.json (or --out), exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed wmss

from wmss.losses import IGNORE_INDEX, mixture_cross_entropy  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu.json"
QWEN3 = {  # the published shapes (config.json of Qwen/Qwen3-0.6B-Base and Qwen/Qwen3-1.7B-Base)
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
TOY = {"toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=32, vocab_size=1024)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> tuple[float, float | None, object]:
    """(best seconds, peak extra GiB on CUDA else None, last result) of `repeats` calls after one warm-up."""
    result = fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return best, peak, result


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------- 1. loss


def _features(n: int, dim: int, vocab: int, seed: int, peaked: bool, labels=None):
    """float64 (hidden, weight, labels); peaked: h = 16 w_y / |w_y|^2 + noise, so p_target > 0.99."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / dim**0.5
    if labels is None:
        labels = torch.randint(0, vocab, (n,), generator=gen)
        labels[::7] = IGNORE_INDEX  # ignored rows, as prompt tokens are
    if peaked:
        y = labels.clamp(min=0)
        hidden = 16 * weight[y] / weight[y].pow(2).sum(-1, keepdim=True)
        hidden = hidden + 0.01 * torch.randn(n, dim, generator=gen, dtype=torch.float64) / dim**0.5
    else:
        hidden = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return hidden, weight, labels


def check_loss(device, dtype, n: int, dim: int, vocab: int, repeats: int) -> dict:
    from wmss.losses import fused_mixture_cross_entropy

    out = {}
    for peaked in (False, True):
        h_w, w_w, labels = _features(n, dim, vocab, 1, peaked)
        h_s, w_s, _ = _features(n, dim, vocab, 2, peaked, labels=labels)
        labels = labels.to(device)
        valid = labels != IGNORE_INDEX
        for name, heads in (("sft", [(1.0, h_s, w_s)]), ("jtws", [(0.5, h_w, w_w), (0.5, h_s, w_s)])):
            inputs = [t.to(device, dtype) for _, h, w in heads for t in (h, w)]  # what training feeds in
            coefs = [c for c, _, _ in heads]

            def run(fn, cast):
                leaves = [t.to(cast).clone().requires_grad_(True) for t in inputs]
                loss = fn([(c, leaves[2 * i], leaves[2 * i + 1]) for i, c in enumerate(coefs)])
                loss.backward()
                return loss.detach(), [t.grad for t in leaves]

            def full(hs):  # full logits in the inputs' precision, at least float32
                logits = sum(c * (h @ w.t()).to(torch.promote_types(h.dtype, torch.float32)) for c, h, w in hs)
                return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

            ref_loss, ref_grads = run(full, torch.float64)
            fused_s, fused_gib, (loss, grads) = _timed(
                lambda: run(lambda hs: mixture_cross_entropy(hs, labels, reduction="sum"), dtype), device, repeats)
            naive_s, naive_gib, (fp32_loss, fp32_grads) = _timed(lambda: run(full, torch.float32), device, repeats)
            nontarget = torch.ones(vocab, dtype=torch.bool, device=device).index_fill_(0, labels[valid], False)
            zero_rows = {"off": float((grads[-1][nontarget] == 0).all(dim=-1).float().mean())}
            if device.type == "cuda":  # the filter exists in the CUDA kernel only
                _, filtered = run(lambda hs: fused_mixture_cross_entropy(hs, labels, reduction="sum",
                                                                         filter_eps="high"), dtype)
                zero_rows["high"] = float((filtered[-1][nontarget] == 0).all(dim=-1).float().mean())
            p_target = torch.softmax(inputs[-2].double() @ inputs[-1].double().t(), -1)[valid, labels[valid]]
            def loss_err(x):
                return float((x.double() - ref_loss).abs() / ref_loss.abs())

            def grad_err(gs):
                return max(float((g.double() - r).norm() / r.norm()) for g, r in zip(gs, ref_grads))

            out[f"{name}_{'peaked' if peaked else 'random'}"] = {
                "p_target_mean": float(p_target.mean()),
                "loss_rel_err": loss_err(loss), "grad_rel_err": grad_err(grads),
                # the same inputs through float32 full logits: what float32 arithmetic allows at best
                "fp32_full_loss_rel_err": loss_err(fp32_loss), "fp32_full_grad_rel_err": grad_err(fp32_grads),
                "zero_grad_nontarget_rows": zero_rows, "fused_s": fused_s, "naive_fp32_s": naive_s,
                "fused_peak_gib": fused_gib, "naive_fp32_peak_gib": naive_gib}
            del inputs, grads, ref_grads, fp32_grads
            _free(device)
    return {"n": n, "dim": dim, "vocab": vocab, "dtype": str(dtype), "cases": out}


# ---------------------------------------------------------------------------------------- 2. scoring


def _model(shape: dict, seed: int, device, dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**shape, tie_word_embeddings=True, max_position_embeddings=8192)
    with torch.device(device):
        return Qwen3ForCausalLM(config).to(dtype)


def _batch(batch: int, length: int, vocab: int, device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = IGNORE_INDEX  # the first half is the prompt
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def check_scoring(device, dtype, shape: dict, batch: int, length: int, repeats: int) -> dict:
    from wmss.models import output_weight
    from wmss.scoring import score_batch

    model = _model(shape, 0, device, dtype).eval()
    data = _batch(batch, length, shape["vocab_size"], device)
    fast_s, fast_gib, fast = _timed(lambda: torch.no_grad()(score_batch)(model, output_weight(model), data),
                                    device, repeats)
    reference_model = model.float()  # the same weights, float32 throughout
    del model
    _free(device)

    @torch.no_grad()
    def reference():  # full float32 logits, softmax, entropy of each distribution predicting a completion token
        logits = reference_model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        logp = logits.float().log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1)[:, :-1]
        mask = data["labels"][:, 1:] != IGNORE_INDEX
        return (ent * mask).sum(1) / mask.sum(1)

    ref_s, ref_gib, ref = _timed(reference, device, repeats)
    del reference_model
    _free(device)
    tokens = batch * length
    return {"batch": batch, "length": length, "dtype": str(dtype), "scorer_tok_s": tokens / fast_s,
            "fp32_full_softmax_tok_s": tokens / ref_s, "speedup": ref_s / fast_s,
            "max_abs_entropy_diff": float((fast.float() - ref).abs().max()), "mean_entropy": float(ref.mean()),
            "scorer_peak_gib": fast_gib, "reference_peak_gib": ref_gib}


# --------------------------------------------------------------------------------------- 3. training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_training(device, dtype, shape_name: str, shape: dict, mode: str, *, rows: int, length: int,
                   micro_tokens: int, steps: int, peak_tflops: float, work: Path) -> dict:
    """`steps` optimizer steps of `rows` samples of `length` tokens through the real loop on one device."""
    import pyarrow.parquet as pq

    from wmss.config import TrainingConfig
    from wmss.models import load_tokenizer
    from wmss.plan import build_plan
    from wmss.train_loop import plan_table, run_plain

    folder = work / f"{mode}-{shape_name}"
    tokenizer = load_tokenizer(work / "tokenizer")
    heads, n_trained = [], 0
    for k, weight in enumerate([0.5, 0.5] if mode == "jtws" else [1.0]):
        model = _model(shape, k, device, dtype)
        n_trained += sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder / f"model{k}")
        tokenizer.save_pretrained(folder / f"model{k}")
        heads.append({"model": str(folder / f"model{k}"), "weight": weight, "trainable": True})
        del model
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(rows * steps):
        ids = torch.randint(0, shape["vocab_size"], (length,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2:]})
    plan = build_plan([length] * len(samples), [length - length // 2] * len(samples), world_size=1, epochs=1,
                      seed=0, global_batch=rows, global_batch_tokens=None, micro_batch_tokens=micro_tokens)
    pq.write_table(plan_table(plan, samples), folder / "plan.parquet")
    options = TrainingConfig(workers=1, gpus_per_worker=1 if device.type == "cuda" else 0, zero=3,
                             bf16=dtype == torch.bfloat16, gradient_checkpointing=True, lr=1e-5,
                             global_batch=rows, micro_batch_tokens=micro_tokens, max_length=length, warmup_ratio=0)
    job = {"mode": mode, "tokenizer": heads[-1]["model"], "options": options.model_dump(), "heads": heads,
           "n_micro": plan.n_micro, "step_tokens": plan.step_tokens, "mlflow": None, "val_every": None,
           "localizer": None}
    _free(device)
    start = time.perf_counter()
    metrics = run_plain(job, folder / "plan.parquet", folder / "run")
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    tokens_s = float(metrics["tokens_per_s"])  # the last step's: after warm-up
    _free(device)
    return {"shape": shape_name, "mode": mode, "trained_params": n_trained, "steps": plan.n_steps,
            "tokens_per_step": rows * length, "micro_batch_tokens": micro_tokens, "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_s,
            "mfu": 6 * n_trained * tokens_s / (peak_tflops * 1e12), "peak_gib": peak, "wall_s": wall}


# ------------------------------------------------------------------------------------------- driver


def _guarded(results: dict, key: str, fn) -> None:
    """Run one check; a failure is recorded (and fails the script) without losing the others' numbers."""
    try:
        results[key] = fn()
    except Exception as err:  # noqa: BLE001 - the report must say what broke and go on
        results[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        print(f"{key}: FAILED {type(err).__name__}: {err}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="toy sizes (a CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200: 989)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TOY if args.small else QWEN3
    first = next(iter(shapes.values()))
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                     "torch": torch.__version__, "dtype": str(dtype)}
    n, dim = (256, 64) if args.small else (8192, 1024)
    _guarded(results, "loss", lambda: check_loss(device, dtype, n, dim, first["vocab_size"], args.repeats))
    batch, length = (2, 64) if args.small else (8, 2048)
    _guarded(results, "scoring", lambda: check_scoring(device, dtype, first, batch, length, args.repeats))
    # one process group for every training run (DeepSpeed keeps groups of the first one it sees)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(device.index or 0), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    from wmss.train_loop import init_distributed

    init_distributed()
    with tempfile.TemporaryDirectory(prefix="wmss-gpu-") as tmp:
        work = Path(tmp)
        from wmss.models import make_tiny_model

        make_tiny_model(work / "tokenizer")  # a tokenizer for the random models (its ids fit any vocabulary)
        rows, length, micro = (4, 64, 128) if args.small else (8, 2048, 8192)
        for shape_name, shape in shapes.items():
            for mode in ("sft", "jtws"):
                _guarded(results, f"train_{mode}_{shape_name}", lambda: check_training(
                    device, dtype, shape_name, shape, mode, rows=rows, length=length, micro_tokens=micro,
                    steps=3, peak_tflops=args.peak_tflops, work=work))
    bf16 = dtype == torch.bfloat16
    checks = {}
    for case, r in results.get("loss", {}).get("cases", {}).items():
        # as close to the float64 reference as float32 full logits get (x1.5), or, for bf16 matmuls with
        # float32 accumulation, within a few parts in 1e2
        floor = 1.5 * max(r["fp32_full_loss_rel_err"], 1e-6), 1.5 * max(r["fp32_full_grad_rel_err"], 1e-6)
        if bf16:
            floor = max(floor[0], 1e-2), max(floor[1], 5e-2)
        checks[f"loss.{case}"] = r["loss_rel_err"] <= floor[0] and r["grad_rel_err"] <= floor[1]
        checks[f"loss.{case}.no_zeroed_rows"] = r["zero_grad_nontarget_rows"]["off"] == 0.0
    if "error" not in results.get("scoring", {"error": 1}):
        checks["scoring.entropy"] = results["scoring"]["max_abs_entropy_diff"] < (5e-2 if bf16 else 1e-3)
    for key in [k for k in results if k.startswith(("loss", "scoring", "train_"))]:
        if "error" in results[key]:
            checks[key] = False
        elif key.startswith("train_"):
            checks[key] = results[key]["loss"] == results[key]["loss"] and results[key]["steps"] == 3
    results["checks"] = checks
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(report(results))
    return 0 if checks and all(checks.values()) else 1


def report(results: dict) -> str:
    """The one table the script prints."""
    lines = [f"device {results['device']}, torch {results['torch']}, {results['dtype']}"]
    loss = results.get("loss", {})
    for case, r in loss.get("cases", {}).items():
        zero = ", ".join(f"filter {k}: {100 * v:.1f} %" for k, v in r["zero_grad_nontarget_rows"].items())
        lines.append(f"loss {case:<12} p_y {r['p_target_mean']:.4f}  loss err {r['loss_rel_err']:.1e}  grad err "
                     f"{r['grad_rel_err']:.1e}  zero-gradient non-target rows ({zero})  fused "
                     f"{r['fused_s'] * 1e3:.1f} ms vs fp32 full {r['naive_fp32_s'] * 1e3:.1f} ms")
    s = results.get("scoring", {})
    if "error" not in s and s:
        lines.append(f"scoring {s['scorer_tok_s']:.0f} tok/s vs fp32 full softmax {s['fp32_full_softmax_tok_s']:.0f} "
                     f"tok/s = {s['speedup']:.2f}x, max |dH| {s['max_abs_entropy_diff']:.2e} (mean H {s['mean_entropy']:.2f})")
    lines.append(f"{'training':<16}{'params':>10}{'tok/step':>10}{'tok/s':>10}{'MFU':>8}{'peak GiB':>10}{'wall s':>8}")
    for key, r in results.items():
        if key.startswith("train_") and "error" not in r:
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            lines.append(f"{r['mode'] + ' ' + r['shape']:<16}{r['trained_params'] / 1e9:>9.2f}B{r['tokens_per_step']:>10}"
                         f"{r['tokens_per_s']:>10.0f}{100 * r['mfu']:>7.1f}%{peak:>10}{r['wall_s']:>8.0f}")
    lines.append("checks: " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in results["checks"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
