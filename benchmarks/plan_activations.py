"""The activation model of `wmss plan` (wmss.capacity) against measured memory: tiny Qwen3 models of several
sizes, one padded micro-batch each, forward in float32 on CPU through the training objective
(wmss.objective.MixObjective, the CPU chunked loss), with and without non-reentrant activation checkpointing.

The same in bfloat16 (the dtype of GPU training; RMSNorm's float32 copies are then real copies).

Measured: the bytes of every tensor storage alive at the end of the forward that was not alive before it
(parameters excluded; autograd's saved tensors are kept as Python objects by an identity saved-tensor hook,
so they are counted too) — what the backward needs. With checkpointing the backward also rebuilds one layer
at a time: that part is measured as the largest storage total one layer saves in the run without
checkpointing (forward hooks around each decoder layer). Predicted: `activation_bytes` for the dtype.

Writes benchmarks/results/plan_activations.json and prints the table.

    python benchmarks/plan_activations.py
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "plan_activations.json"
# (layers, hidden, heads, kv_heads, intermediate, vocab, rows, width): three sizes, widths 64-512
CASES = [
    (2, 128, 2, 1, 384, 2048, 4, 64),
    (4, 256, 4, 2, 768, 4096, 3, 128),
    (3, 384, 6, 2, 1024, 8192, 2, 256),
    (6, 512, 8, 4, 1536, 4096, 2, 512),
]
TOLERANCE = 0.25


def _model(layers, hidden, heads, kv_heads, intermediate, vocab, dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=64, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _batch(vocab: int, rows: int, width: int):
    """A right-padded micro-batch as wmss.plan.collate builds it: the last row is 3/4 full."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, width), generator=gen)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[-1, 3 * width // 4:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :4] = -100  # a prompt
    return ids, mask, labels


def _live_storages() -> dict[int, int]:
    out = {}
    with warnings.catch_warnings():  # isinstance on some lazily deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


def measure(layers, hidden, heads, kv_heads, intermediate, vocab, rows, width, dtype=torch.float32) -> dict:
    """Measured bytes for one case: {"no_ckpt": held, "ckpt_kept": held with checkpointing, "layer": the
    largest one layer saves, "ckpt": ckpt_kept + layer}."""
    from wmss.objective import MixObjective

    ids, mask, labels = _batch(vocab, rows, width)
    out: dict[str, int] = {}
    for ckpt in (False, True):
        model = _model(layers, hidden, heads, kv_heads, intermediate, vocab, dtype)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        objective = MixObjective([model], [1.0]).train()
        layer_bytes, seen, current = [], set(), [0]

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                current[0] += storage.nbytes()
            return t

        def before(module, args):
            module._wmss_start = current[0]

        def after(module, args, output):
            layer_bytes.append(current[0] - module._wmss_start)

        hooks = [m.register_forward_pre_hook(before) for m in model.model.layers]
        hooks += [m.register_forward_hook(after) for m in model.model.layers]
        gc.collect()
        existing = _live_storages()
        seen.update(existing)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss, _ = objective(ids, mask, labels, scale=1.0, noise_seed=0)
        gc.collect()
        held = sum(n for ptr, n in _live_storages().items() if ptr not in existing)
        loss.backward()
        for h in hooks:
            h.remove()
        if ckpt:
            out["ckpt_kept"] = held
        else:
            out["no_ckpt"], out["layer"] = held, max(layer_bytes)
        del objective, model, loss
    out["ckpt"] = out["ckpt_kept"] + out["layer"]
    return out


def predict(layers, hidden, heads, kv_heads, intermediate, vocab, rows, width, dtype=torch.float32) -> dict:
    from wmss.capacity import ModelShape, activation_bytes, layer_activation_bytes

    shape = ModelShape(hidden, intermediate, layers, heads, kv_heads, 64, vocab, False)
    tokens, s = rows * width, torch.finfo(dtype).bits // 8
    no_ckpt = activation_bytes(shape, tokens, width, s, checkpointing=False)
    ckpt = activation_bytes(shape, tokens, width, s, checkpointing=True)
    return {"no_ckpt": no_ckpt["kept"], "ckpt_kept": ckpt["kept"],
            "layer": layer_activation_bytes(shape, tokens, width, s), "ckpt": ckpt["kept"] + ckpt["recompute"]}


def run(cases=CASES, dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for case in cases:
            rows.append(compare(case, dtype))
    return rows


def compare(case, dtype=torch.float32) -> dict:
    """Measured and predicted bytes of one case, and their ratios (predicted / measured)."""
    measured, predicted = measure(*case, dtype=dtype), predict(*case, dtype=dtype)
    keys = ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "rows", "width")
    return {**dict(zip(keys, case)), "dtype": str(dtype).removeprefix("torch."), "tokens": case[6] * case[7],
            "measured": measured,
            "predicted": predicted,
            "ratio": {k: round(predicted[k] / measured[k], 3) for k in ("no_ckpt", "ckpt", "layer")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = run()
    print(f"{'model (L x h, heads/kv)':<26}{'dtype':>10}{'tokens':>8}{'no ckpt MiB meas/pred':>24}{'ckpt MiB meas/pred':>22}")
    for r in rows:
        m, p = r["measured"], r["predicted"]
        print(f"{r['layers']} x {r['hidden']}, {r['heads']}/{r['kv_heads']:<15}{r['dtype']:>10}{r['tokens']:>8}"
              f"{m['no_ckpt'] / 2**20:>12.2f} / {p['no_ckpt'] / 2**20:<9.2f}{m['ckpt'] / 2**20:>10.2f} / {p['ckpt'] / 2**20:<9.2f}")
    worst = max(abs(r["ratio"][k] - 1) for r in rows for k in ("no_ckpt", "ckpt"))
    print(f"largest deviation {worst:.1%} (tolerance {TOLERANCE:.0%})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.machine(), "torch": torch.__version__,
                                    "tolerance": TOLERANCE, "largest_deviation": round(worst, 4), "cases": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
