"""wmss.selection: `wmss select` draws the active set from a scores parquet exactly as wmss.curriculum does,
and refuses scores whose share of samples with an uncertified sign of ΔH is above ceda.max_uncertified."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmss.cli import main as wmss_main
from wmss.curriculum import draw_active_set, sampling_weights
from wmss.errors import ConfigError, InputError
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
        "alpha": 0.1, "beta": 0.8, "gamma": 0.1, "formula": "code", "multiplier": 1.0, "seed": 42, "dedup": True}
    weights = sampling_weights(scores["entropy_weak"], scores["entropy_strong"], 0.1, 0.8, 0.1)
    indices, _ = draw_active_set(weights, 200, 42, True)  # method.md: seed 42, the authors' code
    assert pq.read_table(tmp_path / "active.parquet").column("id").to_pylist() == [f"s{i}" for i in indices]


def test_bad_scores_are_named(tmp_path):
    path = tmp_path / "scores.parquet"
    with pytest.raises(InputError, match="no such scores file"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "b"], "entropy_weak": [1.0, 2.0]})
    with pytest.raises(InputError, match=r"scores.parquet: missing column\(s\) \['entropy_strong'\]"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "b"], "entropy_weak": [1.0, None], "entropy_strong": [1.0, 2.0]})
    with pytest.raises(InputError, match=r"scores.parquet, row 1, column 'entropy_weak': missing value"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "b"], "entropy_weak": [1.0, float("nan")], "entropy_strong": [1.0, 2.0]})
    with pytest.raises(InputError, match=r"scores.parquet: entropy_weak of sample id 'b' is .*nan"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "a"], "entropy_weak": [1.0, 2.0], "entropy_strong": [1.0, 2.0]})
    with pytest.raises(InputError, match="id 'a' appears more than once"):
        select_active_set(path, tmp_path / "a.parquet")
    write_parquet(path, {"id": ["a", "b"], "entropy_weak": [1.0, 2.0], "entropy_strong": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="multiplier must be a number > 0"):
        select_active_set(path, tmp_path / "a.parquet", multiplier=0)
    with pytest.raises(ConfigError, match="draws no sample"):
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


def test_uncertified_share_is_logged_and_refused_above_the_threshold(tmp_path, capsys):
    path, out = tmp_path / "scores.parquet", tmp_path / "active.parquet"
    certified = np.ones(200, dtype=bool)
    certified[:6] = False  # 3 % of the samples
    _scores(path, certified=certified)
    summary = select_active_set(path, out)
    assert summary["uncertified"] == 6 and summary["share_uncertified"] == pytest.approx(0.03)
    assert json.loads(summary_path(out).read_text())["share_uncertified"] == pytest.approx(0.03)
    assert wmss_main(["select", "--scores", str(path), "--out", str(out)]) == 0
    assert "uncertified 0.030" in capsys.readouterr().out

    out.unlink()
    summary_path(out).unlink()
    with pytest.raises(InputError) as refused:
        select_active_set(path, out, max_uncertified=0.02)
    message = str(refused.value)
    assert "6 of 200 samples (3.0%)" in message and "ceda.max_uncertified = 2.0%" in message
    assert "scoring.backend: torch" in message and "scoring.top_k" in message
    assert not out.exists() and not summary_path(out).exists()
    assert wmss_main(["select", "--scores", str(path), "--out", str(out), "--max-uncertified", "0.02"]) == 2
    assert "uncertified for 6 of 200" in capsys.readouterr().err
    _scores(path, certified=np.zeros(200, dtype=bool))
    assert select_active_set(path, out, max_uncertified=1.0)["share_uncertified"] == 1.0  # the user's choice
    with pytest.raises(ConfigError, match=r"max_uncertified must be a share in \[0, 1\]"):
        select_active_set(path, out, max_uncertified=1.5)


def test_scores_without_a_certified_column(tmp_path):
    path = tmp_path / "scores.parquet"
    _scores(path)  # exact scores written before the column existed, or by hand
    assert select_active_set(path, tmp_path / "a.parquet")["share_uncertified"] == 0.0
    _scores(path, entropy_weak_lower=np.zeros(200), entropy_weak_upper=np.ones(200))
    with pytest.raises(InputError, match="vLLM bounds but no `certified` column"):
        select_active_set(path, tmp_path / "b.parquet")
