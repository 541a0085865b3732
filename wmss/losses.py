"""Losses and per-token statistics computed from final hidden states and output-layer weights.

Nothing here materialises the (tokens x vocabulary) logits: every function walks the rows in chunks, so
memory grows with chunk x V, not N x V. The plain references (`naive_*`) exist to test against.

Conventions: `hidden` is (N, D), `weight` is (V, D) (the output layer, logits = hidden @ weight.T), `labels`
(N,) holds the target of each row, rows with `ignore_index` are skipped. For sequences, labels are NOT
shifted: labels[t] is the token at position t and the distribution at t-1 predicts it.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Rows per chunk at a 32K vocabulary: 512 rows x 32K x 4 bytes = 64 MiB of transient logits, scaled
# inversely with the vocabulary; small next to any model, large enough for an efficient matmul.
DEFAULT_CHUNK_ROWS = 512


def _chunk_rows(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    # keep a chunk's float32 logits near 64 MiB whatever the vocabulary
    return max(1, min(DEFAULT_CHUNK_ROWS * 32768 // max(vocab, 1), n_rows))


def _chunk_logits(heads, start: int, stop: int) -> torch.Tensor:
    """float32 logits of rows [start, stop) of sum_k coef_k * hidden_k @ weight_k.T."""
    logits = None
    for coef, hidden, weight in heads:
        if logits is not None and hidden.dtype == torch.float32:
            logits.addmm_(hidden[start:stop], weight.t(), alpha=coef)  # no second chunk-sized buffer
            continue
        part = (hidden[start:stop] @ weight.t()).float()
        if coef != 1.0:
            part.mul_(coef)
        logits = part if logits is None else logits.add_(part)
    return logits


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-row cross-entropy of a linear combination of linear heads, in row chunks.

    Forward keeps only the per-row log-sum-exp; backward recomputes each chunk's logits (one extra matmul
    per head) instead of storing N x V softmax values."""

    @staticmethod
    def forward(ctx, labels, target_offset, ignore_index, chunk_rows, coefs, *tensors):
        heads = [(c, tensors[2 * i], tensors[2 * i + 1]) for i, c in enumerate(coefs)]
        n_rows, vocab = labels.shape[0], tensors[1].shape[0]
        chunk = _chunk_rows(n_rows, vocab, chunk_rows)
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        losses = torch.zeros(n_rows, dtype=torch.float32, device=labels.device)
        lse = torch.zeros(n_rows, dtype=torch.float32, device=labels.device)
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            logits = _chunk_logits(heads, start, stop)
            rows = torch.arange(stop - start, device=logits.device)
            if target_offset is not None:
                logits[rows, safe_labels[start:stop]] += target_offset[start:stop].float()
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[start:stop] = chunk_lse
            losses[start:stop] = chunk_lse - logits[rows, safe_labels[start:stop]]
        losses = torch.where(valid, losses, torch.zeros_like(losses))
        ctx.save_for_backward(labels, safe_labels, valid, lse, target_offset, *tensors)
        ctx.coefs, ctx.chunk = coefs, chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        labels, safe_labels, valid, lse, target_offset, *tensors = ctx.saved_tensors
        coefs, chunk = ctx.coefs, ctx.chunk
        heads = [(c, tensors[2 * i], tensors[2 * i + 1]) for i, c in enumerate(coefs)]
        needs = ctx.needs_input_grad[5:]
        grads = [torch.zeros_like(t, dtype=torch.float32) if needs[j] else None for j, t in enumerate(tensors)]
        scale = torch.where(valid, grad_losses.float(), torch.zeros_like(lse))
        n_rows = labels.shape[0]
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            if not bool(valid[start:stop].any()):
                continue
            logits = _chunk_logits(heads, start, stop)
            rows = torch.arange(stop - start, device=logits.device)
            if target_offset is not None:
                logits[rows, safe_labels[start:stop]] += target_offset[start:stop].float()
            # d loss / d logits = softmax - one_hot, times the incoming per-row gradient
            grad_logits = logits.sub_(lse[start:stop, None]).exp_()
            grad_logits[rows, safe_labels[start:stop]] -= 1.0
            grad_logits.mul_(scale[start:stop, None])
            for i, (coef, hidden, weight) in enumerate(heads):
                g_h, g_w = grads[2 * i], grads[2 * i + 1]
                if g_h is not None:
                    g_h[start:stop] += coef * (grad_logits @ weight.float())
                if g_w is not None:
                    g_w.addmm_(grad_logits.t(), hidden[start:stop].float(), alpha=coef)
        grads = [g.to(t.dtype) if g is not None else None for g, t in zip(grads, tensors)]
        return (None, None, None, None, None, *grads)


def _reduce(losses: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        # an all-ignored batch gives 0 (not NaN) so padding micro-batches contribute nothing
        return losses.sum() / (labels != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_pair(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam):
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam (the strong model's weight) must be in [0, 1], got {lam}")
    if weight_weak.shape[0] != weight_strong.shape[0]:
        raise ValueError(
            f"weak and strong vocabularies differ ({weight_weak.shape[0]} vs {weight_strong.shape[0]}): "
            "the pair must share one tokenizer")
    for name, hidden, weight in (("weak", hidden_weak, weight_weak), ("strong", hidden_strong, weight_strong)):
        if hidden.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"hidden_{name} {tuple(hidden.shape)} does not match weight_{name} "
                             f"{tuple(weight.shape)}: expected (N, D) and (V, D)")
        if hidden.shape[0] != labels.shape[0]:
            raise ValueError(f"hidden_{name} has {hidden.shape[0]} rows but labels has {labels.shape[0]}")


def linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         target_offset: torch.Tensor | None = None, chunk_rows: int | None = None):
    """Cross-entropy of `hidden @ weight.T` against `labels`, without materialising the logits.

    `target_offset` (N,) is added to each row's target logit before the softmax (UNDIAL's noise)."""
    losses = _ChunkedLinearCE.apply(labels, target_offset, ignore_index, chunk_rows, (1.0,), hidden, weight)
    return _reduce(losses, labels, ignore_index, reduction)


def mixed_cross_entropy(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam,
                        ignore_index: int = IGNORE_INDEX, reduction: str = "mean", *,
                        target_offset: torch.Tensor | None = None, chunk_rows: int | None = None):
    """Cross-entropy of the mixed logits `(1-lam) * hidden_weak @ weight_weak.T + lam * hidden_strong @
    weight_strong.T`, never materialising the N x V logits.

    Value: the mean (or sum / per-row, by `reduction`) over rows whose label is not `ignore_index` of
    `-log softmax(z_mix)[label]`; gradients flow to every input that requires grad. On CUDA, when
    cut-cross-entropy is installed and no `target_offset` is given, the mix is computed as one linear
    cross-entropy over concatenated features `[(1-lam) h_w ; lam h_s] . [W_w ; W_s]^T` by its fused kernel;
    elsewhere rows are processed in chunks with the logits recomputed in backward."""
    _check_pair(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam)
    lam = float(lam)
    if hidden_strong.is_cuda and target_offset is None and reduction in ("mean", "sum"):
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError:
            cce = None
        if cce is not None:
            features = torch.cat([(1.0 - lam) * hidden_weak, lam * hidden_strong.to(hidden_weak.dtype)], dim=-1)
            classifier = torch.cat([weight_weak, weight_strong.to(weight_weak.dtype)], dim=-1)
            return cce(features, classifier, labels, ignore_index=ignore_index, reduction=reduction)
    losses = _ChunkedLinearCE.apply(labels, target_offset, ignore_index, chunk_rows, (1.0 - lam, lam),
                                    hidden_weak, weight_weak, hidden_strong, weight_strong)
    return _reduce(losses, labels, ignore_index, reduction)


def naive_mixed_cross_entropy(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam,
                              ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
    """Plain reference for `mixed_cross_entropy`: builds both models' full logits and mixes them."""
    _check_pair(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam)
    z_mix = (1.0 - lam) * (hidden_weak @ weight_weak.t()).float() + lam * (hidden_strong @ weight_strong.t()).float()
    return torch.nn.functional.cross_entropy(z_mix, labels, ignore_index=ignore_index, reduction=reduction)


@torch.no_grad()
def token_entropy(hidden: torch.Tensor, weight: torch.Tensor, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Full-vocabulary entropy (natural log, float32) of softmax(hidden @ weight.T) for each of the N rows."""
    n_rows = hidden.shape[0]
    chunk = _chunk_rows(n_rows, weight.shape[0], chunk_rows)
    out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    for start in range(0, n_rows, chunk):
        logits = _chunk_logits([(1.0, hidden, weight)], start, min(start + chunk, n_rows))
        logp = torch.log_softmax(logits, dim=-1)
        out[start:start + chunk] = -(logp.exp() * logp).sum(dim=-1)
    return out


def predicting_rows(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """For (B, T) unshifted labels: a (B, T) mask of the positions t-1 whose distribution predicts a
    supervised token t, and the (n,) targets they predict (row-major order)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask, labels[:, 1:][labels[:, 1:] != ignore_index]


def sample_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-sample mean entropy over completion tokens: for sample b with completion positions C (labels
    != ignore_index), the mean over t in C of H(softmax(logits[b, t-1])), in float32.

    `hidden` is (B, T, D) final hidden states, `labels` (B, T) unshifted. A sample with no completion
    token has no entropy: that is an error, not a silent NaN."""
    mask, _ = predicting_rows(labels, ignore_index)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"samples at batch rows {bad} have no completion tokens to score")
    entropies = token_entropy(hidden[mask], weight, chunk_rows=chunk_rows)
    sample_of_row = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[mask]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, sample_of_row, entropies)
    return sums / counts.float()


@torch.no_grad()
def mixing_diagnostics(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam, *,
                       ignore_index: int = IGNORE_INDEX, max_rows: int = 512) -> dict[str, float]:
    """The method's training diagnostics on (up to `max_rows` of) the supervised rows:
    `margin_strong` — mean over rows of z_s[y] - mean_{k != y} z_s[k] (the strong model's average margin);
    `nontarget_mass_strong` / `nontarget_mass_mix` — mean of 1 - p(y) under the strong model / the mix.
    With the paper's condition (weak margins <= strong ones) the mix keeps more non-target mass, which is
    where JTWS's extra gradient comes from."""
    valid = labels != ignore_index
    idx = torch.nonzero(valid).flatten()[:max_rows]
    if idx.numel() == 0:
        return {"margin_strong": float("nan"), "nontarget_mass_strong": float("nan"), "nontarget_mass_mix": float("nan")}
    y = labels[idx]
    rows = torch.arange(idx.numel(), device=labels.device)
    z_s = (hidden_strong[idx] @ weight_strong.t()).float()
    z_w = (hidden_weak[idx] @ weight_weak.t()).float()
    z_mix = (1.0 - lam) * z_w + lam * z_s
    vocab = z_s.shape[1]
    target_s = z_s[rows, y]
    margin = target_s - (z_s.sum(dim=1) - target_s) / (vocab - 1)
    p_s = torch.softmax(z_s, dim=-1)[rows, y]
    p_mix = torch.softmax(z_mix, dim=-1)[rows, y]
    return {"margin_strong": float(margin.mean()), "nontarget_mass_strong": float((1 - p_s).mean()),
            "nontarget_mass_mix": float((1 - p_mix).mean())}


def neftune_noise(embeds: torch.Tensor, alpha: float, attention_mask: torch.Tensor | None = None, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """NEFTune: input embeddings (B, T, d) plus uniform noise U(-1, 1) * alpha / sqrt(L * d), with L each
    sample's number of real tokens (attention mask sum; T without a mask). Padding positions get none."""
    batch, seq, dim = embeds.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
    lengths = attention_mask.sum(dim=1).clamp(min=1).to(torch.float32)
    scale = (alpha / torch.sqrt(lengths * dim)).to(embeds.dtype)[:, None, None]
    noise = torch.rand(embeds.shape, generator=generator, device=embeds.device, dtype=torch.float32) * 2 - 1
    return embeds + noise.to(embeds.dtype) * scale * attention_mask[..., None].to(embeds.dtype)


def undial_target_noise(labels: torch.Tensor, lengths: torch.Tensor, sigma: float, *,
                        ignore_index: int = IGNORE_INDEX, generator: torch.Generator | None = None) -> torch.Tensor:
    """UNDIAL as the paper ran it: Gaussian noise sigma * eps / sqrt(L) for each row's target-token logit,
    L being the length of the row's sequence; pass it as `target_offset` to the cross-entropy. Ignored rows
    get 0."""
    eps = torch.randn(labels.shape, generator=generator, device=labels.device, dtype=torch.float32)
    noise = sigma * eps / torch.sqrt(lengths.to(torch.float32).clamp(min=1))
    return torch.where(labels != ignore_index, noise, torch.zeros_like(noise))


def entropy_bounds_from_topk(topk_logprobs: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy estimate and bounds per position from the top-K log-probabilities (n, K), sorted or not.

    With p_1..p_K the top-K probabilities, tail mass r = 1 - sum p_i and H_K = -sum p_i ln p_i:
    lower = H_K + r * (-ln p_K) (every tail token has probability <= p_K, the smallest kept),
    upper = H_K + r * ln((V - K) / r) (the tail spread evenly); the estimate is the midpoint of the two.
    With K = V the tail is empty and all three equal the exact entropy."""
    logp = topk_logprobs.double()
    k = logp.shape[-1]
    p = logp.exp()
    h_k = -(p * logp).sum(dim=-1)
    r = (1.0 - p.sum(dim=-1)).clamp(min=0.0)
    p_min = p.min(dim=-1).values
    lower = h_k + r * (-torch.log(p_min.clamp(min=1e-300)))
    if vocab_size > k:
        upper = h_k + torch.where(r > 0, r * torch.log((vocab_size - k) / r.clamp(min=1e-300)), torch.zeros_like(r))
    else:
        upper = h_k.clone()
    upper = torch.maximum(upper, lower)
    estimate = (lower + upper) / 2
    return estimate.float(), lower.float(), upper.float()

