"""CEDA: turn weak/strong entropy scores into a sampling distribution and draw the active set.

Pure numpy; method.md "Phase 2" is the specification."""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np

FORMULAS = ("code", "paper-v2")


def _name(ids: Sequence | None, i: int) -> str:
    return f"id {ids[i]!r}" if ids is not None else f"index {i}"


def _check_entropies(values: np.ndarray, what: str, ids: Sequence | None) -> None:
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what} of sample {_name(ids, i)} is {values[i]!r}: entropies must be finite and >= 0 "
                         f"({bad.size} bad value(s) in all)")


def _share(term: np.ndarray) -> np.ndarray:
    """The term normalised to sum to 1, or all zeros when it is empty (sums to 0)."""
    total = term.sum()
    return term / total if total > 0 else np.zeros_like(term)


def sampling_weights(entropy_weak, entropy_strong, alpha: float, beta: float, gamma: float,
                     formula: str = "code", *, ids: Sequence | None = None) -> np.ndarray:
    """CEDA sampling probabilities over the samples (float64, sums to 1).

    With dH = H_strong - H_weak and [x]+ = max(x, 0):
    - "code" (the authors' code): p ∝ α·Hw/ΣHw + β·[-dH]+/Σ[-dH]+ + γ·[dH]+/Σ[dH]+, a term whose
      normaliser is 0 contributing nothing;
    - "paper-v2" (v2 Eq. 9): p ∝ α·[-dH]+ + β·Hs + γ·[dH]+.
    `ids` only names samples in error messages."""
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    h_weak = np.asarray(entropy_weak, dtype=np.float64)
    h_strong = np.asarray(entropy_strong, dtype=np.float64)
    if h_weak.ndim != 1 or h_weak.shape != h_strong.shape:
        raise ValueError(f"entropy_weak and entropy_strong must be 1-D of equal length, got shapes "
                         f"{h_weak.shape} and {h_strong.shape}")
    if ids is not None and len(ids) != h_weak.size:
        raise ValueError(f"{len(ids)} ids for {h_weak.size} entropy values")
    if h_weak.size == 0:
        raise ValueError("no samples to weight")
    _check_entropies(h_weak, "entropy_weak", ids)
    _check_entropies(h_strong, "entropy_strong", ids)
    delta = h_strong - h_weak
    consolidated = np.maximum(-delta, 0.0)  # the strong model grew more certain
    regressed = np.maximum(delta, 0.0)      # the strong model grew less certain
    if formula == "code":
        raw = alpha * _share(h_weak) + beta * _share(consolidated) + gamma * _share(regressed)
    else:
        raw = alpha * consolidated + beta * h_strong + gamma * regressed
    total = raw.sum()
    if not total > 0:
        raise ValueError(f"all sampling weights are zero (formula {formula!r}, alpha={alpha}, beta={beta}, "
                         f"gamma={gamma}): no sample can be drawn; check the coefficients and the scores")
    return raw / total


def draw_active_set(weights, n: int, seed: int, dedup: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` indices i.i.d. from `weights` with replacement (seeded) and return `(ids, counts)`: the
    distinct drawn indices in ascending order and how many copies of each the active set keeps — 1 each
    with `dedup`, the number of times it was drawn without. `n - len(ids)` draws were repeats."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D array, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not weights.sum() > 0:
        raise ValueError("weights must be finite, >= 0 and not all zero")
    if int(n) < 1:
        raise ValueError(f"the active set needs n >= 1 draws, got {n}")
    rng = np.random.default_rng(seed)
    drawn = rng.choice(weights.size, size=int(n), replace=True, p=weights / weights.sum())
    indices, counts = np.unique(drawn, return_counts=True)
    return indices, (np.ones_like(counts) if dedup else counts)
