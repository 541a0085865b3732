import numpy as np
import pytest

from wmss.curriculum import draw_active_set, sampling_weights


def _naive_code(hw, hs, a, b, c):
    d = hs - hw
    terms = [hw, np.maximum(-d, 0), np.maximum(d, 0)]
    p = sum(coef * (t / t.sum() if t.sum() > 0 else 0 * t) for coef, t in zip((a, b, c), terms))
    return p / p.sum()


def test_code_and_paper_formulas():
    rng = np.random.default_rng(0)
    hw, hs = rng.random(100) * 3, rng.random(100) * 3
    np.testing.assert_allclose(sampling_weights(hw, hs, 0.1, 0.8, 0.1), _naive_code(hw, hs, 0.1, 0.8, 0.1), rtol=1e-12)
    d = hs - hw
    raw = 0.1 * np.maximum(-d, 0) + 0.8 * hs + 0.1 * np.maximum(d, 0)
    np.testing.assert_allclose(sampling_weights(hw, hs, 0.1, 0.8, 0.1, formula="paper-v2"), raw / raw.sum(), rtol=1e-12)
    w = sampling_weights(hw, hs, 0.2, 0.5, 0.3)
    assert w.dtype == np.float64 and abs(w.sum() - 1) < 1e-12


def test_empty_term_contributes_nothing():
    hw = np.array([1.0, 2.0, 3.0])
    hs = hw - 0.5  # every sample consolidated: the regression term is empty
    w = sampling_weights(hw, hs, 0.5, 0.5, 0.2)
    np.testing.assert_allclose(w, _naive_code(hw, hs, 0.5, 0.5, 0.0), rtol=1e-12)
    with pytest.raises(ValueError, match="all sampling weights are zero"):
        sampling_weights(hw, hs, 0.0, 0.0, 1.0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="alpha"):
        sampling_weights([1.0], [1.0], -0.1, 0.8, 0.1)
    with pytest.raises(ValueError, match="'b'"):
        sampling_weights([1.0, np.nan], [1.0, 1.0], 0.1, 0.8, 0.1, ids=["a", "b"])
    with pytest.raises(ValueError, match="entropy_strong of sample id 'a'"):
        sampling_weights([1.0, 1.0], [-1.0, 1.0], 0.1, 0.8, 0.1, ids=["a", "b"])
    with pytest.raises(ValueError, match="equal length"):
        sampling_weights([1.0, 1.0], [1.0], 0.1, 0.8, 0.1)
    with pytest.raises(ValueError, match="formula"):
        sampling_weights([1.0], [1.0], 0.1, 0.8, 0.1, formula="v3")
    with pytest.raises(ValueError, match="not all zero"):
        draw_active_set([0.0, 0.0], 3, seed=0)


def test_draw_is_seeded_and_dedup_keeps_each_once():
    w = np.array([0.7, 0.2, 0.1, 0.0])
    ids, counts = draw_active_set(w, 50, seed=1, dedup=False)
    ids2, counts2 = draw_active_set(w, 50, seed=1, dedup=False)
    assert np.array_equal(ids, ids2) and np.array_equal(counts, counts2)
    assert counts.sum() == 50 and 3 not in ids
    dedup_ids, dedup_counts = draw_active_set(w, 50, seed=1)
    assert np.array_equal(dedup_ids, ids) and set(dedup_counts) == {1}
    # the draw follows the weights
    big_ids, big_counts = draw_active_set(w, 200_000, seed=2, dedup=False)
    np.testing.assert_allclose(big_counts / 200_000, w[big_ids], atol=0.01)
