"""GPU checks and timings with plain torch: the one script to run when a session is lent the GPU machine
(it has torch and transformers but no Ray, vLLM, DeepSpeed or MLflow; carry cut-cross-entropy).

1. mixed CE: `mixed_cross_entropy` (cut-cross-entropy's fused kernel on CUDA) against the naive full-logit
   reference in float32, on random inputs at Qwen3's vocabulary: loss and the four gradients (relative
   error), and the time and peak memory of forward + backward of each.
2. entropy scoring: tokens/s of the exact scorer (`wmss.scoring.score_batch`, entropies from the final hidden
   states in chunks) against a full-softmax reference on a random Qwen3-0.6B-sized model, and their
   largest entropy difference.
3. JTWS step: forward + backward of a WeakStrongPair of two random Qwen3-0.6B-sized models with the mixed
   CE; achieved TFLOP/s (6 x parameters x tokens) and MFU against `--peak-tflops` (H200 bf16 dense: 989).

Writes benchmarks/results/gpu.json (or --out) and prints a table; exits 1 if a check is out of tolerance.
`--small --device cpu` runs every part at toy sizes (tests/test_benchmarks.py does, so the script cannot rot).

    python benchmarks/gpu_checks.py                      # on the GPU machine
    python benchmarks/gpu_checks.py --small --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed wmss

from wmss.losses import mixed_cross_entropy, naive_mixed_cross_entropy, predicting_rows  # noqa: E402
from wmss.models import WeakStrongPair, output_weight  # noqa: E402
from wmss.scoring import score_batch  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu.json"
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, head_dim=32, vocab_size=1024)


def _timed(fn, device, repeats: int) -> tuple[float, float | None, object]:
    """(best seconds, peak extra GiB on CUDA else None, last result) of `repeats` calls after one warm-up."""
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return best, peak, result


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_mixed_ce(device, dtype, n: int, dim: int, vocab: int, repeats: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(n, dim, generator=gen), torch.randn(vocab, dim, generator=gen) / dim**0.5,
              torch.randn(n, dim, generator=gen), torch.randn(vocab, dim, generator=gen) / dim**0.5]
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    labels[::7] = -100  # ignored rows, as prompt tokens are

    def run(fn, cast):
        tensors = [t.to(device, cast, copy=True).requires_grad_() for t in inputs]  # fresh leaves per call
        loss = fn(*tensors, labels, 0.3)
        loss.backward()
        return loss.detach(), [t.grad for t in tensors]

    fused_s, fused_gib, (loss, grads) = _timed(lambda: run(mixed_cross_entropy, dtype), device, repeats)
    naive_s, naive_gib, (ref_loss, ref_grads) = _timed(lambda: run(naive_mixed_cross_entropy, torch.float32),
                                                       device, repeats)
    return {"n": n, "dim": dim, "vocab": vocab, "dtype": str(dtype), "loss_rel_err": _rel(loss, ref_loss),
            "grad_rel_err": max(_rel(g, r) for g, r in zip(grads, ref_grads)), "fused_s": fused_s,
            "naive_fp32_s": naive_s, "fused_peak_gib": fused_gib, "naive_fp32_peak_gib": naive_gib}


def _model(shape: dict, seed: int, device, dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**shape, tie_word_embeddings=True, max_position_embeddings=4096)
    return Qwen3ForCausalLM(config).to(device, dtype)


def _batch(batch: int, length: int, vocab: int, device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the first half is the prompt
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def check_scoring(device, dtype, shape: dict, batch: int, length: int, repeats: int) -> dict:
    model = _model(shape, 0, device, dtype).eval()
    data = _batch(batch, length, shape["vocab_size"], device)

    @torch.no_grad()
    def reference():  # full logits, softmax, entropy of the distribution predicting each completion token
        logp = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.float().log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1)[:, :-1]
        mask = data["labels"][:, 1:] != -100
        return (ent * mask).sum(1) / mask.sum(1)

    fused_s, fused_gib, fused = _timed(lambda: torch.no_grad()(score_batch)(model, output_weight(model), data),
                                       device, repeats)
    ref_s, ref_gib, ref = _timed(reference, device, repeats)
    tokens = batch * length
    return {"batch": batch, "length": length, "fused_tok_s": tokens / fused_s, "reference_tok_s": tokens / ref_s,
            "speedup": ref_s / fused_s, "max_abs_diff": float((fused.float() - ref).abs().max()),
            "fused_peak_gib": fused_gib, "reference_peak_gib": ref_gib}


def check_jtws_step(device, dtype, shape: dict, batch: int, length: int, repeats: int, peak_tflops: float) -> dict:
    pair = WeakStrongPair(_model(shape, 0, device, dtype), _model(shape, 1, device, dtype))
    data = _batch(batch, length, shape["vocab_size"], device)
    rows, targets = predicting_rows(data["labels"])
    weights = pair.output_weights()

    def step():
        pair.zero_grad(set_to_none=True)
        h_weak, h_strong = pair(data["input_ids"], data["attention_mask"])
        loss = mixed_cross_entropy(h_weak[rows], weights[0], h_strong[rows], weights[1], targets, 0.5)
        loss.backward()
        return loss.detach()

    seconds, peak, _ = _timed(step, device, repeats)
    params = sum(p.numel() for p in pair.parameters())
    tflops = 6 * params * batch * length / seconds / 1e12
    return {"batch": batch, "length": length, "params": params, "step_s": seconds, "tflops": tflops,
            "mfu": tflops / peak_tflops, "peak_gib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="toy sizes (a CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TOY if args.small else QWEN3_06B
    n, dim = (256, 64) if args.small else (8192, 1024)
    batch, length = (2, 64) if args.small else (8, 2048)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dtype),
        "mixed_ce": check_mixed_ce(device, dtype, n, dim, shape["vocab_size"], args.repeats),
        "scoring": check_scoring(device, dtype, shape, batch, length, args.repeats),
        "jtws_step": check_jtws_step(device, dtype, shape, batch // 2, length, args.repeats, args.peak_tflops),
    }
    # bf16 inputs against a float32 reference: a few parts in 1e3; float32 against float32: ~1e-6
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    checks = {"mixed_ce.loss": results["mixed_ce"]["loss_rel_err"] < tol,
              "mixed_ce.grads": results["mixed_ce"]["grad_rel_err"] < 5 * tol,
              "scoring.entropy": results["scoring"]["max_abs_diff"] < (5e-2 if dtype == torch.bfloat16 else 1e-3)}
    results["checks"] = checks
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    m, s, j = results["mixed_ce"], results["scoring"], results["jtws_step"]
    print(f"device {results['device']}, {dtype}")
    print(f"mixed CE  N={m['n']} D={m['dim']} V={m['vocab']}: loss rel err {m['loss_rel_err']:.2e}, grads "
          f"{m['grad_rel_err']:.2e}; fused {m['fused_s'] * 1e3:.1f} ms vs naive fp32 {m['naive_fp32_s'] * 1e3:.1f} ms"
          + (f"; peak {m['fused_peak_gib']:.2f} vs {m['naive_fp32_peak_gib']:.2f} GiB" if m["fused_peak_gib"] is not None else ""))
    print(f"scoring   {s['fused_tok_s']:.0f} tok/s vs reference {s['reference_tok_s']:.0f} tok/s = {s['speedup']:.2f}x, "
          f"max |diff| {s['max_abs_diff']:.2e}")
    print(f"JTWS step {j['params'] / 1e6:.1f}M params, {j['step_s'] * 1e3:.0f} ms, {j['tflops']:.1f} TFLOP/s, MFU {100 * j['mfu']:.1f} %")
    print("checks: " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in checks.items()))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
