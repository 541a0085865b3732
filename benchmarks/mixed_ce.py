"""Fused (chunked) vs naive mixed-logit cross-entropy: peak memory and time of forward + backward.

Each measurement runs in a fresh subprocess so peak RSS is its own; memory is reported as the peak RSS
growth over the inputs already in place, time as the best of `--repeats` steps (the least disturbed by other load). Writes
benchmarks/results/mixed_ce.json and prints a table with the fused/naive ratios.

    python benchmarks/mixed_ce.py            # N=4096, D=256, V in (32768, 65536)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "mixed_ce.json"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(impl: str, n: int, dim: int, vocab: int, repeats: int) -> dict:
    import torch

    from wmss.losses import mixed_cross_entropy, naive_mixed_cross_entropy

    torch.manual_seed(0)
    fn = mixed_cross_entropy if impl == "fused" else naive_mixed_cross_entropy
    tensors = [torch.randn(n, dim), torch.randn(vocab, dim) / dim**0.5, torch.randn(n, dim), torch.randn(vocab, dim) / dim**0.5]
    labels = torch.randint(0, vocab, (n,))
    grads = [torch.zeros_like(t) for t in tensors]  # gradient buffers count as inputs, not loss memory
    for t in tensors:
        t.requires_grad_()
    base = _rss_mib()
    times = []
    for _ in range(repeats):
        for t, g in zip(tensors, grads):
            t.grad = g
        start = time.perf_counter()
        fn(*tensors, labels, 0.5).backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"impl": impl, "n": n, "dim": dim, "vocab": vocab, "seconds": min(times),
            "peak_extra_mib": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=1, help=argparse.SUPPRESS)  # internal: run one measurement
    args = parser.parse_args()
    if args.one:
        impl, vocab = args.one[0].split(":")
        print(json.dumps(measure(impl, args.n, args.dim, int(vocab), args.repeats)))
        return
    rows = []
    for vocab in args.vocab:
        pair = {}
        for impl in ("naive", "fused"):
            out = subprocess.run([sys.executable, __file__, "--one", f"{impl}:{vocab}", "--n", str(args.n),
                                  "--dim", str(args.dim), "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True).stdout
            pair[impl] = json.loads(out.strip().splitlines()[-1])
        rows.append({"n": args.n, "dim": args.dim, "vocab": vocab,
                     "naive_s": pair["naive"]["seconds"], "fused_s": pair["fused"]["seconds"],
                     "naive_peak_mib": pair["naive"]["peak_extra_mib"], "fused_peak_mib": pair["fused"]["peak_extra_mib"],
                     "time_ratio": pair["fused"]["seconds"] / pair["naive"]["seconds"],
                     "memory_ratio": pair["fused"]["peak_extra_mib"] / pair["naive"]["peak_extra_mib"]})
    print(f"{'N':>6} {'D':>5} {'V':>7} {'naive s':>9} {'fused s':>9} {'time x':>7} {'naive MiB':>10} {'fused MiB':>10} {'mem x':>6}")
    for r in rows:
        print(f"{r['n']:>6} {r['dim']:>5} {r['vocab']:>7} {r['naive_s']:>9.3f} {r['fused_s']:>9.3f} {r['time_ratio']:>7.2f} "
              f"{r['naive_peak_mib']:>10.0f} {r['fused_peak_mib']:>10.0f} {r['memory_ratio']:>6.3f}")
    RESULTS.parent.mkdir(exist_ok=True)
    from wmss.io import write_json

    write_json(RESULTS, {"machine": f"{platform.machine()} {platform.processor()} cpus={len(__import__('os').sched_getaffinity(0))}",
                         "forward+backward of the mixed CE, both sides trained, lam=0.5, float32": rows})


if __name__ == "__main__":
    main()
