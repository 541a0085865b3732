"""The fused/chunked losses against plain full-logit references on random inputs."""

import pytest
import torch

from wmss.losses import (
    IGNORE_INDEX,
    entropy_bounds_from_topk,
    label_smoothing_term,
    linear_cross_entropy,
    mixed_cross_entropy,
    mixture_cross_entropy,
    mixing_diagnostics,
    naive_mixed_cross_entropy,
    neftune_noise,
    sample_entropy,
    token_entropy,
    undial_target_noise,
)


def _inputs(n, d_weak, d_strong, vocab, seed, ignore_share=0.25):
    g = torch.Generator().manual_seed(seed)
    hw = torch.randn(n, d_weak, generator=g, dtype=torch.float32, requires_grad=True)
    ww = (torch.randn(vocab, d_weak, generator=g) / d_weak**0.5).requires_grad_()
    hs = torch.randn(n, d_strong, generator=g, dtype=torch.float32, requires_grad=True)
    ws = (torch.randn(vocab, d_strong, generator=g) / d_strong**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_share] = -100
    return hw, ww, hs, ws, labels


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n,d_weak,d_strong,vocab,chunk", [(37, 16, 24, 101, 8), (200, 32, 8, 517, 64), (64, 12, 12, 50, None)])
def test_fused_mixed_ce_matches_naive(lam, n, d_weak, d_strong, vocab, chunk):
    fused_in = _inputs(n, d_weak, d_strong, vocab, seed=n + vocab)
    naive_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in fused_in]
    fused = mixed_cross_entropy(*fused_in, lam, chunk_rows=chunk)
    naive = naive_mixed_cross_entropy(*naive_in, lam)
    assert _rel_err(fused.detach(), naive.detach()) < 1e-5
    fused.backward()
    naive.backward()
    for name, a, b in zip(("hidden_weak", "weight_weak", "hidden_strong", "weight_strong"), fused_in, naive_in):
        if b.grad.abs().max() == 0:  # lam = 0 or 1 switches one side off entirely
            assert a.grad.abs().max() == 0, name
        else:
            assert _rel_err(a.grad, b.grad) < 1e-5, name


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_nonuniform_upstream_gradient(reduction):
    fused_in = _inputs(50, 8, 8, 64, seed=3)
    naive_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in fused_in]
    fused = mixed_cross_entropy(*fused_in, 0.4, reduction=reduction, chunk_rows=7)
    naive = naive_mixed_cross_entropy(*naive_in, 0.4, reduction=reduction)
    assert _rel_err(fused.detach(), naive.detach()) < 1e-5
    upstream = torch.rand(fused.shape)
    (fused * upstream).sum().backward()
    (naive * upstream).sum().backward()
    for a, b in zip(fused_in[:4], naive_in[:4]):
        assert _rel_err(a.grad, b.grad) < 1e-5


def test_frozen_side_gets_no_gradient_and_all_ignored_gives_zero():
    hw, ww, hs, ws, labels = _inputs(20, 8, 8, 30, seed=5)
    hw.requires_grad_(False)
    ww.requires_grad_(False)
    mixed_cross_entropy(hw, ww, hs, ws, labels, 0.5).backward()
    assert hw.grad is None and ww.grad is None and hs.grad is not None
    empty = mixed_cross_entropy(hw, ww, hs, ws, torch.full_like(labels, -100), 0.5)
    assert float(empty.detach()) == 0.0


def test_linear_ce_with_target_offset_matches_shifted_logits():
    hw, ww, _, _, labels = _inputs(40, 16, 16, 80, seed=9)
    offset = torch.randn(40)
    ref_in = [t.detach().clone().requires_grad_() for t in (hw, ww)]
    loss = linear_cross_entropy(hw, ww, labels, target_offset=offset, chunk_rows=9)
    logits = ref_in[0] @ ref_in[1].t()
    valid = labels != -100
    shifted = logits.clone()
    shifted[valid, labels[valid]] += offset[valid]
    ref = torch.nn.functional.cross_entropy(shifted, labels, ignore_index=-100)
    assert _rel_err(loss.detach(), ref.detach()) < 1e-5
    loss.backward()
    ref.backward()
    assert _rel_err(hw.grad, ref_in[0].grad) < 1e-5 and _rel_err(ww.grad, ref_in[1].grad) < 1e-5


def test_bad_arguments_are_named():
    hw, ww, hs, ws, labels = _inputs(10, 8, 8, 30, seed=1)
    with pytest.raises(ValueError, match="lam"):
        mixed_cross_entropy(hw, ww, hs, ws, labels, 1.5)
    with pytest.raises(ValueError, match="vocabularies differ"):
        mixed_cross_entropy(hw, ww, hs, ws[:-1], labels, 0.5)
    with pytest.raises(ValueError, match="rows"):
        mixed_cross_entropy(hw, ww, hs, ws, labels[:-1], 0.5)


def test_gradient_facts_of_the_method():
    """dL/dz_s = lam (P_mix - e_y) and dL/dz_w = (1-lam)(P_mix - e_y), through the fused loss with W = I."""
    g = torch.Generator().manual_seed(0)
    vocab, lam = 12, 0.3
    z_w = torch.randn(5, vocab, generator=g, requires_grad=True)
    z_s = torch.randn(5, vocab, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (5,), generator=g)
    eye = torch.eye(vocab)
    mixed_cross_entropy(z_w, eye, z_s, eye, labels, lam, reduction="sum").backward()
    p_mix = torch.softmax((1 - lam) * z_w.detach() + lam * z_s.detach(), dim=-1)
    residual = p_mix - torch.nn.functional.one_hot(labels, vocab).float()
    assert torch.allclose(z_s.grad, lam * residual, atol=1e-6)
    assert torch.allclose(z_w.grad, (1 - lam) * residual, atol=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_theorem_weaker_margins_keep_more_nontarget_mass(seed):
    """If every weak margin z_w[y] - z_w[k] <= the strong one, the mix's non-target mass >= the strong one's."""
    g = torch.Generator().manual_seed(seed)
    vocab, n = 50, 16
    z_s = torch.randn(n, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    rows = torch.arange(n)
    strong_margin = z_s[rows, labels][:, None] - z_s
    # any weak logits whose margins are no larger: shrink each margin by a random non-negative amount
    weak_margin = strong_margin - torch.rand(n, vocab, generator=g) * 4
    weak_margin[rows, labels] = 0.0
    z_w = -weak_margin + torch.randn(n, 1, generator=g)  # z_w[y] - z_w[k] == weak_margin[k]
    for lam in (0.1, 0.5, 0.9):
        eye = torch.eye(vocab)
        diag = mixing_diagnostics(z_w, eye, z_s, eye, labels, lam)
        assert diag["nontarget_mass_mix"] >= diag["nontarget_mass_strong"] - 1e-6


def test_token_and_sample_entropy_match_full_logits():
    g = torch.Generator().manual_seed(2)
    batch, seq, dim, vocab = 3, 9, 16, 77
    hidden = torch.randn(batch, seq, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g)
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
    naive_rows = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(token_entropy(hidden.reshape(-1, dim), weight, chunk_rows=5), naive_rows.reshape(-1), atol=1e-5)
    labels = torch.full((batch, seq), -100)
    labels[0, 4:] = 1
    labels[1, 2:5] = 2
    labels[2, 8] = 3
    got = sample_entropy(hidden, weight, labels, chunk_rows=4)
    want = torch.stack([naive_rows[0, 3:8].mean(), naive_rows[1, 1:4].mean(), naive_rows[2, 7:8].mean()])
    assert torch.allclose(got, want, atol=1e-5)
    labels[2, 8] = -100
    with pytest.raises(ValueError, match="no completion tokens"):
        sample_entropy(hidden, weight, labels)


def test_entropy_bounds_contain_exact_and_collapse_at_full_vocab():
    g = torch.Generator().manual_seed(4)
    vocab = 200
    logp = torch.log_softmax(torch.randn(30, vocab, generator=g) * 2, dim=-1)
    exact = -(logp.exp() * logp).sum(-1)
    for k in (1, 5, 20):
        top = logp.topk(k, dim=-1).values
        est, lower, upper = entropy_bounds_from_topk(top, vocab)
        assert bool((lower <= exact + 1e-5).all() and (exact <= upper + 1e-5).all())
        assert bool(((lower <= est) & (est <= upper)).all())
    est, lower, upper = entropy_bounds_from_topk(logp, vocab)
    assert torch.allclose(est, exact, atol=1e-5) and torch.allclose(lower, upper)


def test_neftune_and_undial_scales():
    g = torch.Generator().manual_seed(0)
    embeds = torch.zeros(2, 6, 8)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    noisy = neftune_noise(embeds, 5.0, mask, generator=g)
    assert float(noisy[0].abs().max()) <= 5.0 / (6 * 8) ** 0.5
    assert float(noisy[1, :4].abs().max()) <= 5.0 / (4 * 8) ** 0.5
    assert float(noisy[1, 4:].abs().max()) == 0.0
    labels = torch.tensor([3, -100] * 5000)
    noise = undial_target_noise(labels, torch.full((10000,), 16), 1.0, generator=g)
    assert float(noise[1::2].abs().max()) == 0.0
    assert abs(float(noise[::2].std()) - 0.25) < 0.02


@pytest.mark.parametrize("n_heads", [1, 2])
def test_label_smoothing_term_matches_torch_label_smoothing(n_heads):
    """The label-smoothing control's loss, CE of the mix + label_smoothing_term, equals PyTorch's
    label-smoothed cross-entropy of the full mixed logits (values and every gradient), on random inputs with
    ignored rows."""
    gen = torch.Generator().manual_seed(n_heads)
    n, dim, vocab, eps = 40, 16, 97, 0.15
    coefs = [0.3, 0.7][:n_heads] if n_heads == 2 else [1.0]
    tensors = [(torch.randn(n, dim, generator=gen, dtype=torch.float64, requires_grad=True),
                (torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / 4).requires_grad_())
               for _ in coefs]
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::5] = IGNORE_INDEX
    heads = [(c, h, w) for c, (h, w) in zip(coefs, tensors)]
    got = mixture_cross_entropy(heads, labels, reduction="sum") + label_smoothing_term(heads, labels, eps)
    logits = sum(c * h @ w.t() for c, h, w in heads)
    want = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum",
                                             label_smoothing=eps)
    leaves = [t for pair in tensors for t in pair]
    got_grads = torch.autograd.grad(got, leaves)
    want_grads = torch.autograd.grad(want, leaves)
    # the cross-entropy part runs in float32 (the training dtype's floor); the smoothing term in float64 here
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert float(label_smoothing_term(heads, labels, eps)) != 0.0
