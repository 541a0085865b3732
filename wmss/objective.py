"""The training objective: what one micro-batch computes from a list of weighted models, as the module
DeepSpeed wraps.

The loss is the cross-entropy of the mixed logits `z = sum_k w_k * z_k` on the supervised tokens. SFT is
one head (w = 1); JTWS is two (weak 1 - lam, strong lam); a third model in the mix is one more head. NEFTune
and UNDIAL are noise options of a one-head objective; label smoothing (eps) applies to any mix. The LAST
head is the model that is kept (and the one validation scores). The output-layer weights are used inside this module's forward, so ZeRO-3 gathers them
there (they are registered as external parameters)."""

from __future__ import annotations

import torch

from wmss.losses import (label_smoothing_term, mixture_cross_entropy, mixture_diagnostics, neftune_noise, predicting_rows,
                         undial_target_noise)
from wmss.models import final_hidden, output_weight


class MixObjective(torch.nn.Module):
    """`models[k]` with mixing weight `weights[k]`; `trainable[k]` False freezes model k (no gradients, no
    optimizer state, forward without autograd). `filter_eps` is passed to the fused loss (None: exact)."""

    def __init__(self, models, weights, *, trainable=None, neftune_alpha: float | None = None,
                 undial_sigma: float | None = None, label_smoothing: float | None = None, zero3: bool = False,
                 filter_eps: float | str | None = None):
        super().__init__()
        if len(models) != len(weights) or not models:
            raise ValueError(f"MixObjective: {len(models)} model(s) but {len(weights)} weight(s)")
        trainable = [True] * len(models) if trainable is None else list(trainable)
        if not trainable[-1]:
            raise ValueError("MixObjective: the kept (last) model must be trainable")
        if len(models) > 1 and (neftune_alpha or undial_sigma):
            raise ValueError("NEFTune and UNDIAL noise are options of single-model SFT, not of a mix of "
                             f"{len(models)} models")
        vocab = {output_weight(m).shape[0] for m in models}
        if len(vocab) > 1:
            raise ValueError(f"MixObjective: the models' output layers have different vocabularies {sorted(vocab)}; "
                             "their logits are mixed token by token, so they must share one tokenizer")
        self.models = torch.nn.ModuleList(models)
        self.weights = [float(w) for w in weights]
        self.trainable = trainable
        self.neftune_alpha, self.undial_sigma, self.filter_eps = neftune_alpha, undial_sigma, filter_eps
        self.label_smoothing = label_smoothing
        for model, train in zip(models, trainable):
            if not train:
                model.requires_grad_(False)
        if zero3:
            import deepspeed

            for weight in self.output_weights():
                deepspeed.zero.register_external_parameter(self, weight)

    @property
    def kept(self):
        return self.models[-1]

    def output_weights(self) -> list[torch.Tensor]:
        return [output_weight(m) for m in self.models]

    def _hidden(self, k: int, input_ids, attention_mask, generator) -> torch.Tensor:
        model = self.models[k]
        embeds = None
        if self.neftune_alpha and self.training:
            embeds = neftune_noise(model.get_input_embeddings()(input_ids), self.neftune_alpha, attention_mask,
                                   generator=generator)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable[k]):
            return final_hidden(model, input_ids, attention_mask, inputs_embeds=embeds)

    def forward(self, input_ids, attention_mask, labels, scale: float, noise_seed: int, diagnose: bool = False,
                kept_only: bool = False):
        """(summed loss, detached; loss * scale for backward; diagnostics dict). `kept_only`: the kept
        model's plain cross-entropy (validation)."""
        rows_mask, targets = predicting_rows(labels)
        generator = torch.Generator(device=input_ids.device).manual_seed(noise_seed)
        ks = [len(self.models) - 1] if kept_only else range(len(self.models))
        weights = self.output_weights()
        heads = [(1.0 if kept_only else self.weights[k],
                  self._hidden(k, input_ids, attention_mask, generator)[rows_mask], weights[k]) for k in ks]
        offset = None
        if self.undial_sigma and self.training and not kept_only:
            lengths = attention_mask.sum(dim=1, keepdim=True).expand_as(rows_mask)[rows_mask]
            offset = undial_target_noise(targets, lengths, self.undial_sigma, generator=generator)
        loss = mixture_cross_entropy(heads, targets, reduction="sum", target_offset=offset, filter_eps=self.filter_eps)
        if self.label_smoothing and self.training and not kept_only:
            loss = loss + label_smoothing_term(heads, targets, self.label_smoothing)
        stats = {}
        if diagnose:
            stats = mixture_diagnostics([(c, h.detach(), w.detach()) for c, h, w in heads], targets)
        return loss.detach(), loss * scale, stats
