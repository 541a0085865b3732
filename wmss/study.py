"""Statistics and presentation of a multi-seed study: turns each seed's metrics per method and benchmark
into means with Student-t confidence intervals and paired per-seed differences against a reference
method, and shows them as Markdown tables and a matplotlib figure.

Pure: numpy, scipy and matplotlib only. The summary is plain JSON (seed keys are strings in "values")."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

PerSeed = Mapping[int, Mapping[str, Mapping[str, Mapping[str, float]]]]
PERCENT_METRICS = ("accuracy",)  # shown in percent points, one decimal; every other metric with 3 decimals


def t_interval(values: Sequence[float], confidence: float) -> dict:
    """{"n", "mean", "ci": [lo, hi]} of `values`, the Student-t interval of the mean; ci is None for n = 1."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"n": len(x), "mean": mean, "ci": None}
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"n": len(x), "mean": mean, "ci": [mean - half, mean + half]}


def _collect(per_seed: PerSeed, metrics: Sequence[str]) -> dict:
    """{method: {benchmark: {metric: {seed: value}}}} of the requested metrics, methods and benchmarks in
    first-seen order; ValueError on a non-finite value, naming where it is."""
    values: dict = {}
    for seed, methods in per_seed.items():
        for method, benches in methods.items():
            for bench, row in benches.items():
                for metric in metrics:
                    if metric not in row:
                        continue
                    v = float(row[metric])
                    if not math.isfinite(v):
                        raise ValueError(f"summarize_study: non-finite value {v} at seed {seed}, method "
                                         f"{method!r}, benchmark {bench!r}, metric {metric!r}")
                    values.setdefault(method, {}).setdefault(bench, {}).setdefault(metric, {})[int(seed)] = v
    return values


def _stat(by_seed: Mapping[int, float], confidence: float) -> dict:
    """t_interval of the values of {seed: value}, with the values themselves under "values" (str seeds)."""
    seeds = sorted(by_seed)
    return {**t_interval([by_seed[s] for s in seeds], confidence), "values": {str(s): by_seed[s] for s in seeds}}


def summarize_study(per_seed: PerSeed, *, reference: str = "sft", metrics: Sequence[str] = ("accuracy", "nll"),
                    confidence: float = 0.95) -> dict:
    """Mean and Student-t interval over seeds of each method's metrics per benchmark, and of the paired
    per-seed difference method - `reference` (seeds where both have the value).

    `per_seed` is {seed: {method: {benchmark: {metric: value}}}}. Returns {"seeds", "reference",
    "confidence", "metrics", "methods": {method: {benchmark: {metric: {"n", "mean", "ci", "values",
    "diff"}}}}}; "diff" (same fields) is absent for the reference and where the reference lacks the metric.
    ValueError on empty input, a non-finite value, or none of `metrics` present."""
    if not per_seed:
        raise ValueError("summarize_study: no seeds")
    values = _collect(per_seed, metrics)
    if not values:
        raise ValueError(f"summarize_study: none of the metrics {list(metrics)} in any seed's results")
    ref = values.get(reference, {})
    methods: dict = {}
    for method, benches in values.items():
        for bench, by_metric in benches.items():
            for metric, by_seed in by_metric.items():
                cell = _stat(by_seed, confidence)
                ref_seed = ref.get(bench, {}).get(metric, {})
                paired = {s: v - ref_seed[s] for s, v in by_seed.items() if s in ref_seed}
                if method != reference and paired:
                    cell["diff"] = _stat(paired, confidence)
                methods.setdefault(method, {}).setdefault(bench, {})[metric] = cell
    return {"seeds": sorted(int(s) for s in per_seed), "reference": reference, "confidence": confidence,
            "metrics": [m for m in metrics if any(m in b for bs in values.values() for b in bs.values())],
            "methods": methods}


def _benchmarks(summary: Mapping) -> list[str]:
    """The summary's benchmarks, first-seen order."""
    return list(dict.fromkeys(b for benches in summary["methods"].values() for b in benches))


def _scale(metric: str) -> tuple[float, int]:
    """(factor, decimals) a metric is shown with."""
    return (100.0, 1) if metric in PERCENT_METRICS else (1.0, 3)


def _fmt(stat: Mapping | None, metric: str, signed: bool = False) -> str:
    """`mean [lo, hi]` of a summary cell in the metric's display unit; `-` when missing."""
    if stat is None:
        return "-"
    factor, dec = _scale(metric)
    spec = f"{'+' if signed else ''}.{dec}f"
    text = format(factor * stat["mean"], spec)
    if stat["ci"] is not None:
        lo, hi = (format(factor * c, spec) for c in stat["ci"])
        text += f" [{lo}, {hi}]"
    return text


def _label(metric: str) -> str:
    """A metric's name with its display unit."""
    unit = {"accuracy": "%", "nll": "nats/token"}.get(metric)
    return f"{metric} {unit}" if unit else metric


def _main_table(summary: Mapping, bench: str) -> list[str]:
    """Markdown rows: per method, each metric's mean [CI] and its paired difference vs the reference."""
    level = f"{100 * summary['confidence']:g}% CI"
    header = ["method"]
    for metric in summary["metrics"]:
        header += [f"{_label(metric)} ({level})", f"Δ vs {summary['reference']}"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, benches in summary["methods"].items():
        cells = [method]
        for metric in summary["metrics"]:
            stat = benches.get(bench, {}).get(metric)
            cells += [_fmt(stat, metric), _fmt(stat and stat.get("diff"), metric, signed=True)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _seed_table(summary: Mapping, bench: str, metric: str) -> list[str]:
    """Markdown rows: per method, the metric's value at each seed (`-` where missing)."""
    seeds = [str(s) for s in summary["seeds"]]
    factor, dec = _scale(metric)
    rows = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    for method, benches in summary["methods"].items():
        vals = benches.get(bench, {}).get(metric, {}).get("values", {})
        rows.append(f"| {method} | " + " | ".join(f"{factor * vals[s]:.{dec}f}" if s in vals else "-"
                                                  for s in seeds) + " |")
    return rows


def format_study(summary: Mapping) -> str:
    """Markdown report of a `summarize_study` result: per benchmark, a table of means with confidence
    intervals and paired differences vs the reference, then a table of per-seed accuracies."""
    seeds = summary["seeds"]
    lines = ["# WMSS study", "",
             f"Seeds ({len(seeds)}): {', '.join(map(str, seeds))}. Confidence level {100 * summary['confidence']:g}%: "
             f"intervals are Student-t over seeds; Δ columns are paired per-seed differences vs "
             f"`{summary['reference']}`. Accuracy in percent points, nll in nats/token."]
    for bench in _benchmarks(summary):
        lines += ["", f"## {bench}", "", *_main_table(summary, bench)]
        if "accuracy" in summary["metrics"]:
            lines += ["", f"Per-seed accuracy (%) on {bench}:", "", *_seed_table(summary, bench, "accuracy")]
    return "\n".join(lines) + "\n"


def study_figure(summary: Mapping) -> Figure:
    """One panel per benchmark (row) and metric (column) with data: each method's mean with its confidence
    interval as error bars, the reference method's mean as a dashed line; accuracy in percent.
    ValueError when there is nothing to draw."""
    benches, metrics = _benchmarks(summary), summary["metrics"]
    if not benches or not metrics:
        raise ValueError("study_figure: the summary has no results to draw")
    fig = Figure(figsize=(4.5 * len(metrics), 3.2 * len(benches)), layout="constrained")
    axes = fig.subplots(len(benches), len(metrics), squeeze=False)
    for row, bench in enumerate(benches):
        for col, metric in enumerate(metrics):
            cells = {m: b[bench][metric] for m, b in summary["methods"].items() if metric in b.get(bench, {})}
            if cells:
                _panel(axes[row, col], cells, summary, bench, metric)
            else:
                fig.delaxes(axes[row, col])
    return fig


def _panel(ax, cells: Mapping[str, Mapping], summary: Mapping, bench: str, metric: str) -> None:
    """Draw one benchmark x metric panel of `study_figure` from {method: summary cell}."""
    factor, _ = _scale(metric)
    for x, cell in enumerate(cells.values()):
        mean = factor * cell["mean"]
        yerr = None if cell["ci"] is None else [[mean - factor * cell["ci"][0]], [factor * cell["ci"][1] - mean]]
        ax.errorbar([x], [mean], yerr=yerr, fmt="o", capsize=4)
    ref = cells.get(summary["reference"])
    if ref is not None:
        ax.axhline(factor * ref["mean"], linestyle="--", color="grey", label=f"{summary['reference']} mean")
        ax.legend(fontsize="small")
    ax.set_xticks(range(len(cells)), list(cells), rotation=30, ha="right")
    ax.set(ylabel=_label(metric),
           title=f"{bench}: {metric}, {100 * summary['confidence']:g}% CI over {len(summary['seeds'])} seeds")
