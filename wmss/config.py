"""Configuration: pydantic models for every stage, validated before any Ray resources are requested.

Errors name the key, the bad value and what is allowed (see `format_validation_error`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    # unknown keys are errors: a typo must not silently fall back to a default
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainingConfig(_Strict):
    """One training stage (SFT, JTWS or a baseline): optimisation, batching, parallelism, checkpoints."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    max_length: int = Field(4096, ge=2)
    global_batch: int | None = Field(512, ge=1, description="samples per optimizer step")
    global_batch_tokens: int | None = Field(None, ge=1, description="supervised tokens per optimizer step")
    micro_batch_tokens: int = Field(16384, ge=1, description="padded tokens per micro-batch on one worker")
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    zero: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    bf16: bool | None = Field(None, description="bf16 weights/compute; default: on with GPUs, off on CPU")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = only the end")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1 = forever)")
    seed: int = 0
    neftune_alpha: float | None = Field(None, gt=0, description="NEFTune noise scale (SFT baselines)")
    undial_sigma: float | None = Field(None, gt=0, description="UNDIAL target-logit noise (SFT baselines)")

    @model_validator(mode="after")
    def _one_batch_size(self):
        if self.global_batch_tokens is not None and self.global_batch is not None:
            # an explicit token budget wins over the default sample count
            object.__setattr__(self, "global_batch", None)
        if self.global_batch is None and self.global_batch_tokens is None:
            raise ValueError("set training.global_batch (samples) or training.global_batch_tokens")
        return self


class JTWSConfig(_Strict):
    """Phase 3: joint training of the weak and strong models on mixed logits."""

    lam: float = Field(0.5, ge=0, le=1, description="weight of the STRONG model's logits in the mix")
    freeze_weak: bool = False


def format_validation_error(err: ValidationError, where: str = "config") -> str:
    """One line per problem: `<where>: key.path = value: message`."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = "" if e["type"] == "missing" else f" = {value!r}"
        lines.append(f"{where}: {key}{shown}: {e['msg']}")
    return "\n".join(lines)
