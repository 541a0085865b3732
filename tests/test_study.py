"""wmss.study: t intervals against scipy, paired differences, JSON round trip, Markdown, figure, bad input."""

import json

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats

from wmss.study import format_study, study_figure, summarize_study


def _reference_interval(values, confidence=0.95):
    """Mean and t interval computed directly with numpy and scipy.stats.t.interval."""
    x = np.asarray(values, dtype=float)
    lo, hi = stats.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return x.mean(), lo, hi


def _random_study(rng, seeds=(0, 1, 2, 3, 5), methods=("base", "sft", "wmss", "neftune")):
    per_seed = {s: {m: {"synthetic": {"accuracy": float(rng.uniform()), "nll": float(rng.uniform(0.5, 2))},
                        "math": {"accuracy": float(rng.uniform())}} for m in methods} for s in seeds}
    del per_seed[3]["wmss"]["synthetic"]["accuracy"]  # a missing value
    return per_seed


def test_means_and_intervals_match_scipy():
    rng = np.random.default_rng(0)
    per_seed = _random_study(rng)
    summary = summarize_study(per_seed, confidence=0.9)
    assert summary["seeds"] == [0, 1, 2, 3, 5]
    assert list(summary["methods"]) == ["base", "sft", "wmss", "neftune"]
    for method, benches in summary["methods"].items():
        for bench, by_metric in benches.items():
            for metric, cell in by_metric.items():
                seeds = [s for s in per_seed if metric in per_seed[s][method][bench]]
                values = [per_seed[s][method][bench][metric] for s in seeds]
                mean, lo, hi = _reference_interval(values, 0.9)
                assert cell["n"] == len(values)
                assert cell["mean"] == pytest.approx(mean)
                assert cell["ci"] == pytest.approx([lo, hi])
                assert cell["values"] == {str(s): v for s, v in zip(seeds, values)}
                if method == "sft":
                    assert "diff" not in cell
                    continue
                pairs = [s for s in seeds if metric in per_seed[s]["sft"][bench]]
                diffs = [per_seed[s][method][bench][metric] - per_seed[s]["sft"][bench][metric] for s in pairs]
                mean, lo, hi = _reference_interval(diffs, 0.9)
                assert cell["diff"]["n"] == len(diffs)
                assert cell["diff"]["mean"] == pytest.approx(mean)
                assert cell["diff"]["ci"] == pytest.approx([lo, hi])
    assert summary["methods"]["wmss"]["synthetic"]["accuracy"]["n"] == 4


def test_single_seed_has_no_interval_and_missing_reference_metric_has_no_diff():
    summary = summarize_study({7: {"sft": {"b": {"accuracy": 0.5}}, "wmss": {"b": {"accuracy": 0.6, "nll": 1.0}}}})
    assert summary["methods"]["wmss"]["b"]["accuracy"]["ci"] is None
    assert summary["methods"]["wmss"]["b"]["accuracy"]["diff"]["mean"] == pytest.approx(0.1)
    assert "diff" not in summary["methods"]["wmss"]["b"]["nll"]


def test_diff_is_paired_per_seed():
    # a large seed effect shared by both methods; wmss is always 0.01 to 0.02 above sft on the same seed
    seed_effect = [0.1, 0.5, 0.9, 0.3, 0.7]
    gain = [0.010, 0.015, 0.020, 0.012, 0.018]
    per_seed = {s: {"sft": {"b": {"accuracy": e}}, "wmss": {"b": {"accuracy": e + g}}}
                for s, (e, g) in enumerate(zip(seed_effect, gain))}
    diff = summarize_study(per_seed)["methods"]["wmss"]["b"]["accuracy"]["diff"]
    lo, hi = diff["ci"]
    assert 0 < lo < diff["mean"] < hi < 0.025  # paired: clearly positive and narrow
    unpaired = stats.ttest_ind([e + g for e, g in zip(seed_effect, gain)], seed_effect).confidence_interval()
    assert unpaired.low < 0 < unpaired.high and hi - lo < (unpaired.high - unpaired.low) / 10


def test_json_round_trip():
    summary = summarize_study(_random_study(np.random.default_rng(1)))
    assert json.loads(json.dumps(summary)) == summary


def _hand_made():
    return summarize_study({
        0: {"sft": {"synthetic": {"accuracy": 0.60, "nll": 1.200}}, "wmss": {"synthetic": {"accuracy": 0.62, "nll": 1.100}},
            "base": {"synthetic": {"accuracy": 0.40}}},
        1: {"sft": {"synthetic": {"accuracy": 0.64, "nll": 1.300}}, "wmss": {"synthetic": {"accuracy": 0.65, "nll": 1.250}},
            "base": {"synthetic": {"accuracy": 0.44}}},
    })


def test_format_study_cells():
    text = format_study(_hand_made())
    # by hand: t(0.975, 1) = 12.706; sft accuracy 60, 64 -> 62 +- 12.706 * 2; wmss - sft = 2, 1 -> 1.5 +- 12.706 * 0.5
    assert text.startswith("# ")
    assert "0, 1" in text and "95%" in text and "Student-t" in text and "paired" in text
    assert "| method | accuracy % (95% CI) | Δ vs sft | nll nats/token (95% CI) | Δ vs sft |" in text
    assert "| sft | 62.0 [36.6, 87.4] | - | 1.250 [0.615, 1.885] | - |" in text
    assert "| wmss | 63.5 [44.4, 82.6] | +1.5 [-4.9, +7.9] | 1.175 [0.222, 2.128] | -0.075 [-0.393, +0.243] |" in text
    assert "| base | 42.0 [16.6, 67.4] | -20.0 [-20.0, -20.0] | - | - |" in text
    assert "| method | seed 0 | seed 1 |" in text and "| wmss | 62.0 | 65.0 |" in text


def test_study_figure_saves_png(tmp_path):
    summary = summarize_study(_random_study(np.random.default_rng(2)))
    fig = study_figure(summary)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3  # synthetic: accuracy and nll; math: accuracy only
    fig.savefig(tmp_path / "study.png")
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nothing|no results"):
        study_figure({**summary, "methods": {}})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_value_names_its_place(bad):
    per_seed = {0: {"sft": {"b": {"accuracy": 0.5}}}, 3: {"wmss": {"synthetic": {"nll": bad}}}}
    with pytest.raises(ValueError, match=r"seed 3, method 'wmss', benchmark 'synthetic', metric 'nll'"):
        summarize_study(per_seed)


def test_empty_input_raises():
    with pytest.raises(ValueError, match="no seeds"):
        summarize_study({})
    with pytest.raises(ValueError, match="none of the metrics"):
        summarize_study({0: {"sft": {"b": {"bleu": 0.3}}}})


# ------------------------------------------------------------------ `wmss study` end to end (reduced demo)

@pytest.mark.ray
@pytest.mark.slow
def test_study_runs_each_seed_shares_seedless_stages_and_resumes(tmp_path, ray_local, demo_before_phase3):
    """Two seeds of the reduced demo, in a copy of the shared `wmss run` directory: seed 0 (the config's) is
    that run, continued under its own stage names; seed 1 runs Phase 1 and everything after it as
    seed1.<stage>, with a different outcome; the demo's data, base model and base evaluation serve both;
    study.json, study.md and study.png are written and logged to the parent run; a rerun runs nothing."""
    import os
    import subprocess
    import sys

    from conftest import REDUCED_DEMO, REPO, manifest_stages, seed_run
    from mlflow import MlflowClient

    run_dir = tmp_path / "study"
    seed_run(demo_before_phase3, run_dir, mlflow_db=run_dir / "mlflow.db")
    cmd = [sys.executable, "-m", "wmss.cli", "study", "--seeds", "2", "--run-dir", str(run_dir), "--set",
           *REDUCED_DEMO, "baselines.methods=[sft]", "eval.methods=[base,wmss]",
           f"ray.address={ray_local.get_runtime_context().gcs_address}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("demo.data", "demo.base", "sft", "r1.score", "r1.select"):  # seed 0 continues the run
        assert f"[wmss] {stage}: finished earlier, skipped" in done.stdout

    stages = manifest_stages(run_dir)
    per_seed = ["sft", "r1.score", "r1.select", "r1.jtws", "baseline.sft", "eval.wmss", "eval.sft"]
    assert set(stages) == {"demo.data", "demo.base", "eval.base", *per_seed, *(f"seed1.{n}" for n in per_seed)}
    assert stages["sft"]["hash"] != stages["seed1.sft"]["hash"]

    summary = json.loads((run_dir / "study.json").read_text())
    assert summary["seeds"] == [0, 1] and list(summary["methods"]) == ["base", "wmss", "sft"]
    nll = summary["methods"]["wmss"]["synthetic"]["nll"]
    assert nll["n"] == 2 and nll["values"]["0"] != nll["values"]["1"]  # the seed reaches training
    base = summary["methods"]["base"]["synthetic"]["nll"]["values"]
    assert base["0"] == base["1"]  # one base model, evaluated once
    assert summary["methods"]["wmss"]["synthetic"]["accuracy"]["diff"]["n"] == 2
    assert "Δ vs sft" in (run_dir / "study.md").read_text()
    assert (run_dir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    parent = json.loads((run_dir / "manifest.json").read_text())["mlflow_parent_run_id"]
    logged = {a.path for a in client.list_artifacts(parent)} | {a.path for a in client.list_artifacts(parent, "plots")}
    assert {"study.json", "study.md", "plots/study.png"} <= logged
    assert client.get_run(parent).info.status == "FINISHED"

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": running" not in again.stdout, again.stdout  # every stage kept
    assert manifest_stages(run_dir) == stages
