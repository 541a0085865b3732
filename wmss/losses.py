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

    Forward keeps only the per-row log-sum-exp, as (row max m, log of the shifted sum); backward recomputes
    each chunk's logits (one extra matmul per head) instead of storing N x V softmax values. Late in SFT
    p_y is within 1e-4 of 1, where the plain formulas lose most of their digits in float32; so `z - m` is
    exact for the top logit, the shifted sum is `log1p` of the terms other than the max's (which is 1),
    and the target's gradient p_y - 1 is `expm1(log p_y)`."""

    @staticmethod
    def forward(ctx, labels, target_offset, ignore_index, chunk_rows, coefs, *tensors):
        heads = [(c, tensors[2 * i], tensors[2 * i + 1]) for i, c in enumerate(coefs)]
        n_rows, vocab = labels.shape[0], tensors[1].shape[0]
        chunk = _chunk_rows(n_rows, vocab, chunk_rows)
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        losses = torch.zeros(n_rows, dtype=torch.float32, device=labels.device)
        row_max = torch.zeros(n_rows, dtype=torch.float32, device=labels.device)
        log_sum = torch.zeros(n_rows, dtype=torch.float32, device=labels.device)  # lse = row_max + log_sum
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            logits = _chunk_logits(heads, start, stop)
            rows = torch.arange(stop - start, device=logits.device)
            if target_offset is not None:
                logits[rows, safe_labels[start:stop]] += target_offset[start:stop].float()
            top, arg = logits.max(dim=-1)
            logits.sub_(top[:, None])
            rest = logits.exp()
            rest[rows, arg] = 0.0  # the max's own term is exactly 1: log(1 + rest) without rounding 1 + rest
            chunk_log_sum = torch.log1p(rest.sum(dim=-1))
            row_max[start:stop], log_sum[start:stop] = top, chunk_log_sum
            losses[start:stop] = chunk_log_sum - logits[rows, safe_labels[start:stop]]
        losses = torch.where(valid, losses, torch.zeros_like(losses))
        ctx.save_for_backward(labels, safe_labels, valid, row_max, log_sum, target_offset, *tensors)
        ctx.coefs, ctx.chunk = coefs, chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        labels, safe_labels, valid, row_max, log_sum, target_offset, *tensors = ctx.saved_tensors
        coefs, chunk = ctx.coefs, ctx.chunk
        heads = [(c, tensors[2 * i], tensors[2 * i + 1]) for i, c in enumerate(coefs)]
        needs = ctx.needs_input_grad[5:]
        grads = [torch.zeros_like(t, dtype=torch.float32) if needs[j] else None for j, t in enumerate(tensors)]
        scale = torch.where(valid, grad_losses.float(), torch.zeros_like(log_sum))
        n_rows = labels.shape[0]
        # float32 copies of the weights once per backward, not once per chunk (a 150K x 4K bf16 output
        # layer is 2.5 GB in float32)
        weights32 = [weight.float() if grads[2 * i] is not None else None for i, (_, _, weight) in enumerate(heads)]
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            if not bool(valid[start:stop].any()):
                continue
            logits = _chunk_logits(heads, start, stop)
            rows = torch.arange(stop - start, device=logits.device)
            if target_offset is not None:
                logits[rows, safe_labels[start:stop]] += target_offset[start:stop].float()
            # d loss / d logits = softmax - one_hot, times the incoming per-row gradient
            shifted = logits.sub_(row_max[start:stop, None]).sub_(log_sum[start:stop, None])  # log p
            target = safe_labels[start:stop]
            target_grad = torch.expm1(shifted[rows, target])  # p_y - 1 without cancellation
            grad_logits = shifted.exp_()
            grad_logits[rows, target] = target_grad
            grad_logits.mul_(scale[start:stop, None])
            for i, (coef, hidden, weight) in enumerate(heads):
                g_h, g_w = grads[2 * i], grads[2 * i + 1]
                if g_h is not None:
                    g_h[start:stop] += coef * (grad_logits @ weights32[i])
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


def _check_heads(heads, labels):
    if not heads:
        raise ValueError("a mixture needs at least one head")
    vocab = heads[0][2].shape[0]
    for k, (coef, hidden, weight) in enumerate(heads):
        if weight.shape[0] != vocab:
            raise ValueError(f"head {k}'s vocabulary has {weight.shape[0]} rows, head 0's {vocab}: the models of "
                             "a mix must share one tokenizer")
        if hidden.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"head {k}: hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)}: "
                             "expected (N, D) and (V, D)")
        if hidden.shape[0] != labels.shape[0]:
            raise ValueError(f"head {k}: hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
        if not float(coef) >= 0.0:
            raise ValueError(f"head {k}: coefficient {coef} must be >= 0")


def _check_pair(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam):
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam (the strong model's weight) must be in [0, 1], got {lam}")
    if weight_weak.shape[0] != weight_strong.shape[0]:
        raise ValueError(
            f"weak and strong vocabularies differ ({weight_weak.shape[0]} vs {weight_strong.shape[0]}): "
            "the pair must share one tokenizer")
    _check_heads([(1.0 - lam, hidden_weak, weight_weak), (lam, hidden_strong, weight_strong)], labels)


def fused_mixture_cross_entropy(heads, labels, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                                filter_eps: float | str | None = None, impl: str = "cce"):
    """cut-cross-entropy's fused linear cross-entropy of the mix `sum_k coef_k * hidden_k @ weight_k.T`, as
    ONE linear head over concatenated features `[coef_1 h_1 ; ... ; coef_K h_K] . [W_1 ; ... ; W_K]^T`
    (exact: the concatenated dot product is the weighted sum of the heads' logits).

    `filter_eps=None` (the default here, unlike cut-cross-entropy's) computes every vocabulary block's
    gradient: its filter skips blocks whose softmax values are all below the threshold, which zeroes the
    small non-target gradients this method acts on. `impl="torch_compile"` runs on CPU (for tests)."""
    from cut_cross_entropy import linear_cross_entropy as cce

    dtype = heads[0][1].dtype
    if len(heads) == 1 and float(heads[0][0]) == 1.0:  # plain SFT: no copy of the (V, D) output layer
        features, classifier = heads[0][1], heads[0][2].to(dtype)
    else:
        features = torch.cat([float(c) * h.to(dtype) for c, h, _ in heads], dim=-1)
        classifier = torch.cat([w.to(dtype) for _, _, w in heads], dim=-1)
    kwargs = {"filter_eps": filter_eps} if impl == "cce" else {}
    return cce(features, classifier, labels, ignore_index=ignore_index, reduction=reduction, impl=impl, **kwargs)


def _fused_available(hidden: torch.Tensor) -> bool:
    if not hidden.is_cuda:
        return False
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def mixture_cross_entropy(heads, labels, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                          target_offset: torch.Tensor | None = None, chunk_rows: int | None = None,
                          filter_eps: float | str | None = None):
    """Cross-entropy of the mixed logits `sum_k coef_k * hidden_k @ weight_k.T` for `heads` = [(coef_k,
    hidden_k (N, D_k), weight_k (V, D_k)), ...], never materialising the N x V logits. One head is plain
    SFT, two are JTWS's weak/strong mix; any number works.

    Value: the mean (or sum / per-row, by `reduction`) over rows whose label is not `ignore_index` of
    `-log softmax(z_mix)[label]`; gradients flow to every input that requires grad. On CUDA, with
    cut-cross-entropy installed and no `target_offset`, its fused kernel computes it (see
    `fused_mixture_cross_entropy`; `filter_eps` is passed to it); elsewhere rows are processed in chunks
    with the logits recomputed in backward. `target_offset` (N,) is added to each row's target logit
    before the softmax (UNDIAL's noise)."""
    heads = [(float(c), h, w) for c, h, w in heads]
    _check_heads(heads, labels)
    if target_offset is None and reduction in ("mean", "sum") and _fused_available(heads[0][1]):
        return fused_mixture_cross_entropy(heads, labels, ignore_index=ignore_index, reduction=reduction,
                                           filter_eps=filter_eps)
    coefs = tuple(c for c, _, _ in heads)
    tensors = [t for _, h, w in heads for t in (h, w)]
    losses = _ChunkedLinearCE.apply(labels, target_offset, ignore_index, chunk_rows, coefs, *tensors)
    return _reduce(losses, labels, ignore_index, reduction)


def label_smoothing_term(heads, labels, eps: float, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """What label smoothing adds to the cross-entropy of the mixed logits, summed over the supervised rows:
    with PyTorch's definition, (1 - eps) * CE + eps * mean_v(-log p_v) = CE + eps * (z_y - mean_v z_v), and
    both logits are linear in the hidden states (mean_v z_v = h . mean_v W_v), so no logits are built."""
    valid = labels != ignore_index
    target = labels.clamp(min=0)
    term = 0.0
    for coef, hidden, weight in heads:
        # the sums in fp32 (16-bit weights), without an fp32 copy of the (V, D) output layer: only the target
        # rows are gathered, and the mean over the vocabulary accumulates in fp32
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        h = hidden.to(dtype)
        z_y = (h * weight[target].to(dtype)).sum(dim=1)
        z_mean = h @ weight.mean(dim=0, dtype=dtype)
        term = term + float(coef) * (z_y - z_mean)
    return eps * (term * valid).sum()


def linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         target_offset: torch.Tensor | None = None, chunk_rows: int | None = None,
                         filter_eps: float | str | None = None):
    """Cross-entropy of `hidden @ weight.T` against `labels`, without materialising the logits (one head of
    `mixture_cross_entropy`)."""
    return mixture_cross_entropy([(1.0, hidden, weight)], labels, ignore_index=ignore_index, reduction=reduction,
                                 target_offset=target_offset, chunk_rows=chunk_rows, filter_eps=filter_eps)


def mixed_cross_entropy(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam,
                        ignore_index: int = IGNORE_INDEX, reduction: str = "mean", *,
                        target_offset: torch.Tensor | None = None, chunk_rows: int | None = None,
                        filter_eps: float | str | None = None):
    """Cross-entropy of the mixed logits `(1-lam) * hidden_weak @ weight_weak.T + lam * hidden_strong @
    weight_strong.T`: `mixture_cross_entropy` with the weak and the strong head."""
    _check_pair(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam)
    lam = float(lam)
    return mixture_cross_entropy([(1.0 - lam, hidden_weak, weight_weak), (lam, hidden_strong, weight_strong)], labels,
                                 ignore_index=ignore_index, reduction=reduction, target_offset=target_offset,
                                 chunk_rows=chunk_rows, filter_eps=filter_eps)


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
def mixture_diagnostics(heads, labels, *, ignore_index: int = IGNORE_INDEX, max_rows: int = 512) -> dict[str, float]:
    """The method's training diagnostics on (up to `max_rows` of) the supervised rows, for `heads` as in
    `mixture_cross_entropy` whose LAST head is the kept (strong) model:
    `margin_strong` — mean over rows of z_s[y] - mean_{k != y} z_s[k] (the kept model's average margin);
    `nontarget_mass_strong` / `nontarget_mass_mix` — mean of 1 - p(y) under the kept model / the mix.
    With the paper's condition (weak margins <= strong ones) the mix keeps more non-target mass, which is
    where JTWS's extra gradient comes from."""
    valid = labels != ignore_index
    idx = torch.nonzero(valid).flatten()[:max_rows]
    if idx.numel() == 0:
        return {"margin_strong": float("nan"), "nontarget_mass_strong": float("nan"), "nontarget_mass_mix": float("nan")}
    y = labels[idx]
    rows = torch.arange(idx.numel(), device=labels.device)
    zs = [(float(c), (h[idx] @ w.t()).float()) for c, h, w in heads]
    z_s = zs[-1][1]
    z_mix = sum(c * z for c, z in zs)
    vocab = z_s.shape[1]
    target_s = z_s[rows, y]
    margin = target_s - (z_s.sum(dim=1) - target_s) / (vocab - 1)
    p_s = torch.softmax(z_s, dim=-1)[rows, y]
    p_mix = torch.softmax(z_mix, dim=-1)[rows, y]
    return {"margin_strong": float(margin.mean()), "nontarget_mass_strong": float((1 - p_s).mean()),
            "nontarget_mass_mix": float((1 - p_mix).mean())}


def mixing_diagnostics(hidden_weak, weight_weak, hidden_strong, weight_strong, labels, lam, *,
                       ignore_index: int = IGNORE_INDEX, max_rows: int = 512) -> dict[str, float]:
    """`mixture_diagnostics` of the weak/strong pair mixed with weight `lam` on the strong logits."""
    return mixture_diagnostics([(1.0 - lam, hidden_weak, weight_weak), (lam, hidden_strong, weight_strong)], labels,
                               ignore_index=ignore_index, max_rows=max_rows)


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

