"""wmss.selection: `wmss select` draws the active set from a scores parquet exactly as wmss.curriculum does."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmss.cli import main as wmss_main
from wmss.curriculum import draw_active_set, sampling_weights
from wmss.io import write_parquet
from wmss.selection import select_active_set, summary_path


def _scores(path, n=200, seed=0, **override):
    rng = np.random.default_rng(seed)
    columns = {"id": [f"s{i}" for i in range(n)], "n_completion_tokens": rng.integers(1, 500, n),
               "entropy_weak": rng.random(n) * 3, "entropy_strong": rng.random(n) * 3}
    columns.update(override)
    write_parquet(path, pa.table(columns))
    return columns


@pytest.mark.parametrize("formula,multiplier,dedup,seed", [("code", 1.0, True, 0), ("paper-v2", 2.5, False, 7),
                                                          ("code", 0.3, False, 1)])
def test_active_set_is_the_curriculum_draw(tmp_path, formula, multiplier, dedup, seed):
    scores = _scores(tmp_path / "scores.parquet", seed=seed)
    out = tmp_path / "active.parquet"
    summary = select_active_set(tmp_path / "scores.parquet", out, alpha=0.2, beta=0.5, gamma=0.3, formula=formula,
                                multiplier=multiplier, seed=seed, dedup=dedup)

    weights = sampling_weights(scores["entropy_weak"], scores["entropy_strong"], 0.2, 0.5, 0.3, formula)
    n_draws = round(200 * multiplier)
    indices, counts = draw_active_set(weights, n_draws, seed, dedup)
    active = pq.read_table(out)
    assert active.column_names == ["id", "weight", "count"]
    assert active.column("id").to_pylist() == [scores["id"][i] for i in indices]
    np.testing.assert_allclose(active.column("weight").to_numpy(), weights[indices], rtol=1e-15)
    np.testing.assert_array_equal(active.column("count").to_numpy(), counts)
    if dedup:
        assert set(active.column("count").to_pylist()) == {1}
    else:
        assert active.column("count").to_numpy().sum() == n_draws
    assert summary["n_samples"] == 200 and summary["n_draws"] == n_draws
    assert summary["unique"] == len(indices) and summary["repeats"] == n_draws - len(indices)
    assert summary["share_of_D"] == pytest.approx(len(indices) / 200)
    assert summary["active_set_size"] == (len(indices) if dedup else n_draws)
    assert json.loads(summary_path(out).read_text()) == json.loads(json.dumps(summary))


def test_defaults_are_the_methods(tmp_path):
    scores = _scores(tmp_path / "scores.parquet")
    summary = select_active_set(tmp_path / "scores.parquet", tmp_path / "active.parquet")
    assert {k: summary[k] for k in ("alpha", "beta", "gamma", "formula", "multiplier", "seed", "dedup")} == {
        "alpha": 0.1, "beta": 0.8, "gamma": 0.1, "formula": "code", "multiplier": 1.0, "seed": 0, "dedup": True}
    weights = sampling_weights(scores["entropy_weak"], scores["entropy_strong"], 0.1, 0.8, 0.1)
    indices, _ = draw_active_set(weights, 200, 0, True)
    assert pq.read_table(tmp_path / "active.parquet").column("id").to_pylist() == [f"s{i}" for i in indices]


def test_bad_scores_are_named(tmp_path):
    path = tmp_path / "scores.parquet"
    with pytest.raises(FileNotFoundError, match="no such scores file"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "b"], "entropy_weak": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"scores.parquet: missing column\(s\) \['entropy_strong'\]"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "b"], "entropy_weak": [1.0, None], "entropy_strong": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"scores.parquet, row 1, column 'entropy_weak': missing value"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "b"], "entropy_weak": [1.0, float("nan")], "entropy_strong": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"scores.parquet: entropy_weak of sample id 'b' is .*nan"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "a"], "entropy_weak": [1.0, 2.0], "entropy_strong": [1.0, 2.0]})
    with pytest.raises(ValueError, match="id 'a' appears more than once"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "b"], "entropy_weak": [1.0, 2.0], "entropy_strong": [1.0, 2.0]})
    with pytest.raises(ValueError, match="multiplier must be a number > 0"):
        select_active_set(path, tmp_path / "a.parquet", multiplier=0)
    with pytest.raises(ValueError, match="draws no sample"):
        select_active_set(path, tmp_path / "a.parquet", multiplier=0.1)
    assert not (tmp_path / "a.parquet").exists()


def test_cli(tmp_path, capsys):
    _scores(tmp_path / "scores.parquet", n=50)
    out = tmp_path / "active.parquet"
    assert wmss_main(["select", "--scores", str(tmp_path / "scores.parquet"), "--out", str(out), "--no-dedup",
                      "--multiplier", "2", "--seed", "3", "--formula", "paper-v2"]) == 0
    printed = capsys.readouterr().out
    assert "100 draws from 50 samples" in printed and "repeats" in printed and "share of D" in printed
    summary = json.loads(summary_path(out).read_text())
    assert summary["dedup"] is False and summary["formula"] == "paper-v2" and summary["seed"] == 3
    assert pq.read_table(out).column("count").to_numpy().sum() == 100

    assert wmss_main(["select", "--scores", str(tmp_path / "nope.parquet"), "--out", str(out)]) == 2
    assert "nope.parquet: no such scores file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        wmss_main(["select", "--scores", str(tmp_path / "scores.parquet"), "--out", str(out), "--formula", "v3"])
    assert exit_info.value.code == 2
