"""`wmss select` (CEDA, phase 2b): read the weak/strong entropy scores, turn them into sampling
probabilities (wmss.curriculum) and draw the active set that joint training uses.

Output: a parquet with `id`, `weight` (the sample's sampling probability) and `count` (copies in the
active set: 1 each with dedup, the number of draws without), in score-file order, and a summary JSON beside
it (`<out stem>.summary.json`) with the unique count, the repeats, the share of D the set covers and the
share of samples whose scores leave the sign of ΔH = H_strong - H_weak uncertified (the scores' `certified`
column: vLLM's top-K bounds can; the exact torch scores cannot). Above `max_uncertified` it refuses to draw,
since CEDA's consolidation and regression terms rank by that sign."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

import numpy as np

from wmss.config import CedaConfig
from wmss.curriculum import FORMULAS, draw_active_set, sampling_weights
from wmss.errors import ConfigError, InputError
from wmss.io import write_json, write_parquet

SCORE_COLUMNS = ("id", "entropy_weak", "entropy_strong")
DEFAULTS = CedaConfig()


def summary_path(out: str | os.PathLike) -> Path:
    """Where `select_active_set` writes the summary of the active set `out`."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def select_active_set(scores_path: str | os.PathLike, out: str | os.PathLike, *, alpha: float = DEFAULTS.alpha,
                      beta: float = DEFAULTS.beta, gamma: float = DEFAULTS.gamma, formula: str = DEFAULTS.formula,
                      multiplier: float = DEFAULTS.multiplier, seed: int = DEFAULTS.seed, dedup: bool = DEFAULTS.dedup,
                      max_uncertified: float = DEFAULTS.max_uncertified) -> dict:
    """Draw the active set from a scores parquet (`id`, `entropy_weak`, `entropy_strong`, as `wmss score`
    writes it) and write it to `out` (atomically), with the summary beside it.

    N = round(|D| * multiplier) indices are drawn i.i.d. from `sampling_weights(...)` with replacement,
    seeded; `dedup` keeps each drawn sample once. Returns the summary: `n_samples` (|D|), `n_draws` (N),
    `unique`, `repeats` (N - unique), `share_of_D` (unique / |D|), `active_set_size` (rows of training
    data: unique with dedup, N without), `uncertified` / `share_uncertified` (samples whose `certified`
    column is False; a file without the column holds exact scores) and the settings used. Bad settings raise
    ConfigError; bad input, or a share of uncertified samples above `max_uncertified`, raises InputError
    naming the file (and the sample id or column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores_path = Path(scores_path)
    if not np.isfinite(multiplier) or multiplier <= 0:
        raise ConfigError(f"multiplier must be a number > 0 (N = round(|D| * multiplier)), got {multiplier}")
    if not 0 <= max_uncertified <= 1:
        raise ConfigError(f"max_uncertified must be a share in [0, 1], got {max_uncertified}")
    if not scores_path.is_file():
        raise InputError(f"{scores_path}: no such scores file (write one with `wmss score`)")
    try:
        table = pq.read_table(scores_path)
    except Exception as e:  # pyarrow's messages do not name the file
        raise InputError(f"{scores_path}: not a readable Parquet file: {e}") from e
    missing = [c for c in SCORE_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{scores_path}: missing column(s) {missing}; it has {table.column_names} (score both "
                         "models with `wmss score --weak ... --strong ...`)")
    ids = table.column("id").to_pylist()
    if not ids:
        raise InputError(f"{scores_path}: no samples")
    entropies = {}
    for name in SCORE_COLUMNS:
        column = table.column(name)
        nulls = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        if nulls.size:
            raise InputError(f"{scores_path}, row {nulls[0]}, column {name!r}: missing value "
                             f"({nulls.size} missing in all)")
        if name != "id":
            if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
                raise InputError(f"{scores_path}, column {name!r}: expected numbers, got {column.type}")
            entropies[name] = column.to_numpy().astype(np.float64)
    repeated = [sample_id for sample_id, n in Counter(ids).items() if n > 1]
    if repeated:
        raise InputError(f"{scores_path}: id {repeated[0]!r} appears more than once ({len(repeated)} repeated ids)")
    uncertified = _uncertified(table, scores_path)
    share_uncertified = uncertified / len(ids)
    if share_uncertified > max_uncertified:
        raise InputError(f"{scores_path}: the entropy bounds leave the sign of H_strong - H_weak uncertified for "
                         f"{uncertified} of {len(ids)} samples ({share_uncertified:.1%}), above ceda.max_uncertified "
                         f"= {max_uncertified:.1%}; CEDA would rank them by bound midpoints. Rescore with "
                         "scoring.backend: torch (exact), or a larger scoring.top_k, or raise ceda.max_uncertified "
                         "(--max-uncertified)")
    n_draws = int(round(len(ids) * multiplier))
    if n_draws < 1:
        raise ConfigError(f"multiplier {multiplier} draws no sample from {len(ids)} (N = round(|D| * multiplier) "
                         "must be >= 1)")
    try:
        weights = sampling_weights(entropies["entropy_weak"], entropies["entropy_strong"], alpha, beta, gamma,
                                   formula, ids=ids)
    except ValueError as e:
        raise InputError(f"{scores_path}: {e}") from e
    indices, counts = draw_active_set(weights, n_draws, seed, dedup)
    write_parquet(out, {"id": [ids[i] for i in indices], "weight": weights[indices], "count": counts})
    summary = {"scores": str(scores_path), "out": str(out), "n_samples": len(ids), "n_draws": n_draws,
               "unique": int(indices.size), "repeats": int(n_draws - indices.size),
               "share_of_D": indices.size / len(ids), "active_set_size": int(counts.sum()),
               "uncertified": uncertified, "share_uncertified": share_uncertified, "max_uncertified": max_uncertified,
               "alpha": alpha, "beta": beta, "gamma": gamma, "formula": formula, "multiplier": multiplier,
               "seed": seed, "dedup": dedup}
    write_json(summary_path(out), summary)
    return summary


def _uncertified(table, scores_path: Path) -> int:
    """Samples whose `certified` is False; 0 for a file without the column unless it holds bounds."""
    if "certified" not in table.column_names:
        if "entropy_weak_lower" in table.column_names:
            raise InputError(f"{scores_path}: vLLM bounds but no `certified` column (written by an older `wmss "
                             "score`); score it again")
        return 0
    certified = table.column("certified")
    if certified.null_count:
        raise InputError(f"{scores_path}, column 'certified': {certified.null_count} missing value(s)")
    return int((~certified.to_numpy(zero_copy_only=False).astype(bool)).sum())


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `wmss select`; their defaults are CedaConfig's."""
    d = DEFAULTS
    parser.add_argument("--scores", required=True, type=Path, help="scores parquet written by `wmss score`")
    parser.add_argument("--out", required=True, type=Path, help="active-set parquet to write (id, weight, count)")
    parser.add_argument("--alpha", type=float, default=d.alpha, help=f"base-difficulty coefficient (default {d.alpha})")
    parser.add_argument("--beta", type=float, default=d.beta, help=f"consolidation coefficient (default {d.beta})")
    parser.add_argument("--gamma", type=float, default=d.gamma, help=f"regression-repair coefficient (default {d.gamma})")
    parser.add_argument("--formula", choices=FORMULAS, default=d.formula,
                        help="code: the authors' per-term-normalised mix (default); paper-v2: v2 Eq. 9")
    parser.add_argument("--multiplier", type=float, default=d.multiplier,
                        help=f"draws N = round(|D| * multiplier) (default {d.multiplier})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of the draw (default {d.seed})")
    parser.add_argument("--no-dedup", dest="dedup", action="store_false",
                        help="keep repeated draws as extra copies (the authors' code); default keeps each once")
    parser.add_argument("--max-uncertified", type=float, default=d.max_uncertified,
                        help="largest share of samples whose entropy bounds leave the sign of H_strong - H_weak "
                             f"open (default {d.max_uncertified})")


def run_select(args: argparse.Namespace) -> int:
    """Run `wmss select`: write the active set and its summary, print the summary (errors: see
    `select_active_set`)."""
    summary = select_active_set(args.scores, args.out, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                                formula=args.formula, multiplier=args.multiplier, seed=args.seed, dedup=args.dedup,
                                max_uncertified=args.max_uncertified)
    print(f"select: {summary['n_draws']} draws from {summary['n_samples']} samples: {summary['unique']} unique, "
          f"{summary['repeats']} repeats, share of D {summary['share_of_D']:.3f}, "
          f"uncertified {summary['share_uncertified']:.3f}, active set {summary['active_set_size']} "
          f"rows -> {args.out} (summary {summary_path(args.out)})", flush=True)
    return 0
