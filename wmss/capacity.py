"""`wmss plan`: before any run, the predicted peak memory per GPU, tokens per optimizer step and wall time of
every stage of a config, and `check_fits`, which `wmss run` and `wmss submit` call to refuse a config that
will not fit.

The memory model, per GPU (GiB = 2**30 bytes):

- Training (DeepSpeed ZeRO stage z over N workers). A trainable model of P parameters holds its weights (2 B
  in bf16, else 4), fp32 master weights (4, bf16 only) and Adam moments (8), and gradients (4: accumulated in
  fp32 under ZeRO 1-3 with bf16; else the weights' width). ZeRO-1 divides master weights and moments by N,
  ZeRO-2 also the gradients, ZeRO-3 also the weights; a frozen model keeps only its weights. ZeRO-3 adds one
  gathered layer, the prefetch bucket (0.9 h^2) and the reduce bucket (h^2 fp32); ZeRO-1/2 DeepSpeed's
  default 5e8-element gradient bucket.
- Activations of one micro-batch of T padded tokens in rows of width W (`layer_activation_bytes`, derived from
  transformers' modeling_qwen3 and checked against measured CPU peaks by tests/test_capacity.py and
  benchmarks/plan_activations.py). Without checkpointing every layer keeps its full set; with (non-reentrant)
  checkpointing each layer keeps its input (s*h per token) and the backward recomputes one layer at a time.
- The loss: on GPU cut-cross-entropy (no tokens x vocabulary logits): under ZeRO-3 every output layer is
  gathered (s*V*h each) and a trainable one's gradient is materialised (s*V*h) before it is reduced; on CPU
  the chunked loss adds fp32 copies of the output layers and their gradients and ~64 MiB logit chunks.
- Scoring (torch): bf16 weights, the fp32 output-layer copy, one layer's transient forward at the token
  budget, the final hidden states with two fp32 copies (all rows, completion rows) and the entropy chunks. vLLM (scoring and evaluation): the engine
  reserves `gpu_memory_utilization` (0.9) of the GPU; it fits when the weights and the KV cache of one
  longest sequence fit in that share, and the plan reports how many such sequences the rest holds.
- Every GPU stage adds 2 GiB for the CUDA context, NCCL and allocator fragmentation.

Wall time: FLOPs / (GPUs x peak FLOP/s x MFU), with FLOPs per token 2*M forward (M: the matmul parameters,
the output layer included, the input embedding not) plus causal attention 2*layers*q_dim*L (L the mean
sample length); training counts 6*M per trainable model (8*M with checkpointing: the forward runs twice)
and 2*M per frozen one. Evaluation (decode) is bandwidth-bound: no FLOP estimate.

CPU stages (no GPUs per worker) are planned in host memory and never refused (`fits` is None)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wmss.config import (ACTIVE_SET_BASELINES, MIX_BASELINES, TrainingConfig, WMSSConfig, add_config_source_arguments,
                         load_config)
from wmss.errors import ConfigError

GIB = 1 << 30
DEMO = "demo"
RUNTIME_BYTES = 2 * GIB  # CUDA context, NCCL buffers, allocator fragmentation (GPU stages)
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of the GPU (the code does not change it on GPUs)
DS_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce/allgather bucket (ZeRO-1/2)
CPU_CHUNK_BYTES = 64 << 20  # float32 logits of one chunk of the CPU loss and entropy (wmss.losses)
HF_EVAL_BATCH = 8  # HF generation batch (wmss.evaluation.generation)
EVAL_PROMPT_TOKENS = 1024  # allowance for the longest benchmark prompt (chat template + system prompt)
# The paper's data (arXiv 2602.08222): the math part of AM-DeepSeek-R1-Distilled-1.4M with verified answers.
PAPER_DATASET = "a-m-team/AM-DeepSeek-R1-Distilled-1.4M"
PAPER_SAMPLES = 111_657
DEFAULT_MEAN_TOKENS = 2048  # assumed mean sample length (prompt + R1-style solution), capped at max_length
DEFAULT_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM
DEFAULT_MFU = 0.35


@dataclass(frozen=True)
class ModelShape:
    """The config.json fields the plan needs (HF names in the comments)."""

    hidden: int  # hidden_size
    intermediate: int  # intermediate_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim (default hidden_size // num_attention_heads)
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    qk_norm: bool = True  # Qwen3 normalises q and k per head; Llama-style models (SmolLM2) do not

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h = self.hidden
        attention = h * self.q_dim * 2 + h * self.kv_dim * 2
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attention + 3 * h * self.intermediate + norms

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters that multiply every token: the layers and the output layer (not the embedding lookup)."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_dim * dtype_bytes


def _qwen3(hidden, intermediate, tied) -> ModelShape:
    return ModelShape(hidden, intermediate, 36, 32, 8, 128, 151936, tied)


# Published config.json values, so the shipped configs plan without hub access.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen3-4B-Base": _qwen3(2560, 9728, True),
    "Qwen/Qwen3-4B": _qwen3(2560, 9728, True),
    "Qwen/Qwen3-8B-Base": _qwen3(4096, 12288, False),
    "Qwen/Qwen3-8B": _qwen3(4096, 12288, False),
    "smollm2-135m-instruct": ModelShape(576, 1536, 30, 9, 3, 64, 49152, True, qk_norm=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(576, 1536, 30, 9, 3, 64, 49152, True, qk_norm=False),
}


def shape_from_config(config: dict) -> ModelShape:
    """A model's shape from its config.json mapping (the text config of a multimodal one)."""
    config = config.get("text_config", config)
    heads = int(config["num_attention_heads"])
    return ModelShape(hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
                      layers=int(config["num_hidden_layers"]), heads=heads,
                      kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
                      vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
                      qk_norm=config.get("model_type", "qwen3") in ("qwen3", "qwen3_moe"))


def model_shape(ref: str, cfg: WMSSConfig) -> ModelShape:
    """The shape of the model `ref` names: `demo` (the config's tiny model), a shipped config's hub id (built
    in), a folder with a config.json, or any other hub id (its config.json is downloaded)."""
    if ref == DEMO:
        d = cfg.demo  # wmss.workflow's demo base: make_tiny_model's defaults with these sizes
        return ModelShape(d.hidden, 3 * d.hidden, d.layers, d.hidden // 64, 1, 64, 2048, False)
    if ref in KNOWN_SHAPES:
        return KNOWN_SHAPES[ref]
    folder = Path(ref)
    if (folder / "config.json").is_file():
        return shape_from_config(json.loads((folder / "config.json").read_text()))
    try:
        from huggingface_hub import hf_hub_download

        return shape_from_config(json.loads(Path(hf_hub_download(ref, "config.json")).read_text()))
    except Exception as err:  # offline, gated, no such repository: the user must name a folder
        raise ConfigError(f"model {ref!r}: no config.json in a folder of that name, and the hub's could not be "
                          f"read ({type(err).__name__}); point the config at a local model folder") from None


# ---------------------------------------------------------------------------------------- activations


def repeats_kv(shape: ModelShape, masked: bool) -> bool:
    """Whether attention copies k and v to every query head: transformers' SDPA path repeats them when a
    padding mask is passed (no GQA kernel with a mask); with one kv head the repeat is a view."""
    return masked and shape.heads != shape.kv_heads and shape.kv_heads > 1


def layer_activation_bytes(shape: ModelShape, tokens: int, width: int, dtype_bytes: int, masked: bool = True) -> int:
    """Bytes one decoder layer keeps for backward for `tokens` tokens in rows of `width` (HF Qwen3, SDPA).

    Per token, with s the compute dtype's width (RMSNorm works in fp32: its fp32 input copy, 4 B, is the
    input itself in fp32):
      each of the two RMSNorms   4h (fp32 input) + s*h (normalised, before the weight) + s*h (output, the
                                 projections' input) + 4 (rsqrt)
      q/k norms (Qwen3)          (4 + s)(q + kv) + 4(heads + kv_heads)
      attention (SDPA)           q after RoPE, k, v (q-wide when repeated, see `repeats_kv`), the output
                                 (also o_proj's input): s*(2q + 2k'), log-sum-exp 4*heads, and with a
                                 padding mask its float copy s*width
      MLP                        gate, act(gate), up, act*up: 4*s*i
    """
    h, i, q, kv, s = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, dtype_bytes
    kv_saved = q if repeats_kv(shape, masked) else kv
    per_token = 2 * (4 * h + 2 * s * h + 4)
    if shape.qk_norm:
        per_token += (4 + s) * (q + kv) + 4 * (shape.heads + shape.kv_heads)
    per_token += s * (2 * q + 2 * kv_saved) + 4 * shape.heads + (s * width if masked else 0)
    per_token += 4 * s * i
    return tokens * per_token


def outer_activation_bytes(shape: ModelShape, tokens: int, width: int, dtype_bytes: int, checkpointing: bool,
                           masked: bool = True) -> int:
    """Bytes kept outside the decoder layers: token ids (8), the final RMSNorm (4h + s*h + 4), the supervised
    rows' hidden states the loss keeps (s*h, every token counted), RoPE's cos/sin (2 * width * head_dim * s)
    and the loss's per-row bookkeeping (~40 B); with checkpointing the boolean padding mask (rows * width^2)
    is kept as every layer's argument."""
    h, s = shape.hidden, dtype_bytes
    kept = tokens * (8 + 4 * h + s * h + 4 + s * h + 40) + 2 * width * shape.head_dim * s
    if checkpointing and masked:
        kept += tokens * width
    return kept


def activation_bytes(shape: ModelShape, tokens: int, width: int, dtype_bytes: int, checkpointing: bool,
                     masked: bool = True) -> dict[str, int]:
    """{"kept": bytes held for backward at the end of the forward, "recompute": one layer's activations
    rebuilt during the backward (checkpointing only)}."""
    layer = layer_activation_bytes(shape, tokens, width, dtype_bytes, masked)
    outer = outer_activation_bytes(shape, tokens, width, dtype_bytes, checkpointing, masked)
    if checkpointing:
        return {"kept": shape.layers * tokens * shape.hidden * dtype_bytes + outer, "recompute": layer}
    return {"kept": shape.layers * layer + outer, "recompute": 0}


def forward_transient_bytes(shape: ModelShape, tokens: int, width: int, dtype_bytes: int) -> int:
    """Peak transient memory of one layer's forward without autograd (scoring, a frozen model): the residual
    stream and its normalised copy, the fp32 norm copy, then the larger of the MLP's three live intermediates
    and attention's q/k/v/output with the float mask."""
    h, s = shape.hidden, dtype_bytes
    kv = shape.q_dim if repeats_kv(shape, True) else shape.kv_dim
    attention = s * (2 * shape.q_dim + 2 * kv + width)
    return tokens * (2 * s * h + 4 * h + max(3 * s * shape.intermediate, attention))


# -------------------------------------------------------------------------------------------- stages


@dataclass
class StagePlan:
    name: str
    kind: str  # train, score, eval
    device: str  # gpu or cpu (host memory)
    gpus: int  # 0 for a CPU stage
    memory: dict[str, float]  # GiB per component (host memory per worker for a CPU stage)
    peak_gib: float
    fits: bool | None
    notes: list[str] = field(default_factory=list)
    tokens_per_step: int | None = None
    steps: int | None = None
    tflop: float | None = None
    hours: float | None = None
    peak_gib_by_checkpointing: dict[str, float] | None = None  # training: the peak with it "on" and "off"


@dataclass(frozen=True)
class Assumptions:
    gpu_memory_gib: float = 80.0
    gpus: int | None = None  # None: the config's workers / actors per stage
    samples: int | None = None  # None: from the data (the paper's count for its hub dataset)
    mean_tokens: int | None = None  # None: min(DEFAULT_MEAN_TOKENS, max_length)
    tflops: float = DEFAULT_TFLOPS
    mfu: float = DEFAULT_MFU


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def _sample_count(cfg: WMSSConfig, a: Assumptions) -> int | None:
    if a.samples is not None:
        return a.samples
    train = cfg.data.train
    sources = cfg.data.sources()
    if sources is not None:  # a selection: its caps (a mix's upper bound), or the paper's known count
        if all(s.max_samples for s in sources):
            return sum(s.max_samples for s in sources)
        return PAPER_SAMPLES if all(s.path == PAPER_DATASET and not s.max_samples for s in sources) else None
    if train == DEMO:
        return cfg.demo.n_train
    if train == PAPER_DATASET:
        return PAPER_SAMPLES
    path = Path(train)
    if path.suffix == ".jsonl" and path.is_file():
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def _training_stage(name: str, cfg: WMSSConfig, opts: TrainingConfig, heads: list[tuple[ModelShape, bool]],
                    samples: int | None, mean_tokens: int, a: Assumptions) -> StagePlan:
    gpu = opts.gpus_per_worker > 0
    n = a.gpus if (a.gpus and gpu) else opts.workers
    bf16 = opts.bf16 if opts.bf16 is not None else gpu
    s = 2 if bf16 else 4
    ckpt = opts.gradient_checkpointing if opts.gradient_checkpointing is not None else gpu
    z = opts.zero
    max_length = opts.max_length or cfg.max_length
    tokens = max(opts.micro_batch_tokens, max_length)  # a longer sample gets a micro-batch alone
    width = min(max_length, tokens)

    weights = grads = optim = 0.0
    for shape, trainable in heads:
        p = shape.params
        weights += s * p / (n if z >= 3 else 1)
        if trainable:
            grads += (4 if bf16 and z >= 1 else s) * p / (n if z >= 2 else 1)
            optim += ((4 if bf16 else 0) + 8) * p / (n if z >= 1 else 1)
    widest = max((shape for shape, _ in heads), key=lambda sh: sh.layer_params)
    h = max(shape.hidden for shape, _ in heads)
    if z >= 3:
        buffers = s * widest.layer_params + s * 0.9 * h * h + 4 * h * h
    elif z >= 1:
        buffers = s * min(DS_BUCKET_ELEMENTS, sum(sh.params for sh, t in heads if t))
    else:
        buffers = 0.0

    kept, recompute = _mix_activations(heads, tokens, width, s, ckpt)
    loss = 0
    fused = gpu and not opts.undial_sigma  # UNDIAL's target noise takes the chunked loss on GPUs too
    for shape, trainable in heads:
        vh = shape.vocab * shape.hidden
        if fused:
            loss += (s * vh if z >= 3 else 0) + (s * vh if trainable else 0) + tokens * s * shape.hidden
        else:
            loss += (8 * vh if trainable else 0) + 4 * tokens * shape.hidden
    loss += 0 if fused else 3 * CPU_CHUNK_BYTES
    runtime = RUNTIME_BYTES if gpu else 0
    memory = {"weights": weights, "gradients": grads, "optimizer": optim, "zero_buffers": buffers,
              "activations": kept, "recompute": recompute, "loss": loss, "runtime": runtime}
    peak = sum(memory.values())
    other = peak - kept - recompute + sum(_mix_activations(heads, tokens, width, s, not ckpt))
    plan = StagePlan(name, "train", "gpu" if gpu else "cpu", n if gpu else 0, {k: _gib(v) for k, v in memory.items()},
                     _gib(peak), (peak <= a.gpu_memory_gib * GIB) if gpu else None,
                     peak_gib_by_checkpointing={"on" if ckpt else "off": _gib(peak), "off" if ckpt else "on": _gib(other)})
    plan.notes.append(f"ZeRO-{z} over {n} {'GPUs' if gpu else 'CPU workers'}, {'bf16' if bf16 else 'fp32'}, "
                      f"{tokens} padded tokens per micro-batch, activation checkpointing {'on' if ckpt else 'off'} "
                      f"(peak with it {'off' if ckpt else 'on'}: {_gib(other)} GiB)")
    trainable_models = sum(1 for _, t in heads if t)
    plan.notes.append(f"{trainable_models} trainable and {len(heads) - trainable_models} frozen model(s), "
                      f"{sum(sh.params for sh, _ in heads) / 1e9:.2f}B parameters")
    if opts.global_batch_tokens:
        plan.tokens_per_step = opts.global_batch_tokens
        steps_samples = None
    else:
        plan.tokens_per_step = opts.global_batch * mean_tokens
        steps_samples = opts.global_batch
    if samples is not None:
        total_tokens = samples * opts.epochs * mean_tokens
        plan.steps = math.ceil(samples * opts.epochs / steps_samples) if steps_samples else math.ceil(
            total_tokens / plan.tokens_per_step)
        flop = 0.0
        for shape, trainable in heads:
            fwd = 2 * shape.matmul_params + 2 * shape.layers * shape.q_dim * mean_tokens
            flop += fwd * ((4 if ckpt else 3) if trainable else 1) * total_tokens
        _timed(plan, flop, a)
    return plan


def _mix_activations(heads: list[tuple[ModelShape, bool]], tokens: int, width: int, s: int,
                     ckpt: bool) -> tuple[int, int]:
    """(kept, recompute) bytes of a mix: every trainable model keeps its activations; a frozen one runs
    without autograd and keeps its final hidden states for the loss, with one layer at a time transient."""
    kept = recompute = 0
    for shape, trainable in heads:
        if trainable:
            act = activation_bytes(shape, tokens, width, s, ckpt)
            kept += act["kept"]
            recompute = max(recompute, act["recompute"])
        else:
            kept += tokens * shape.hidden * s
            recompute = max(recompute, forward_transient_bytes(shape, tokens, width, s))
    return kept, recompute


def _timed(plan: StagePlan, flop: float, a: Assumptions) -> None:
    plan.tflop = round(flop / 1e12, 1)
    if plan.device == "gpu":
        plan.hours = round(flop / (plan.gpus * a.tflops * 1e12 * a.mfu) / 3600, 2)


def _score_stage(name: str, cfg: WMSSConfig, shapes: list[ModelShape], samples: int | None, mean_tokens: int,
                 a: Assumptions) -> StagePlan:
    sc = cfg.scoring
    gpu = sc.gpus_per_actor > 0
    actors = sc.actors.max * len(shapes)  # one actor pool per model
    n = (a.gpus or max(1, math.ceil(actors * sc.gpus_per_actor))) if gpu else actors
    widest = max(shapes, key=lambda sh: sh.params)
    tokens = max(sc.token_budget, cfg.max_length)
    width = min(cfg.max_length, tokens)
    if sc.backend == "torch":
        s = {"bfloat16": 2, "float16": 2, "float32": 4}[sc.dtype] if sc.dtype else (2 if gpu else 4)
        memory = {"weights": s * widest.params, "output_layer_fp32": 4 * widest.vocab * widest.hidden,
                  "activations": forward_transient_bytes(widest, tokens, width, s),
                  # the final hidden states, their fp32 copy and its completion rows (wmss.losses.sample_entropy)
                  "hidden_states": tokens * widest.hidden * (s + 8), "entropy_chunks": 3 * CPU_CHUNK_BYTES,
                  "runtime": RUNTIME_BYTES if gpu else 0}
        peak = sum(memory.values())
        fits = (peak <= a.gpu_memory_gib * GIB) if gpu else None
        note = f"torch scorer, {'bf16' if s == 2 else 'fp32'}, {tokens} padded tokens per batch"
    else:
        memory, peak, fits, note = _vllm(widest, max(tokens, cfg.max_length + 1), gpu, a,
                                         sc.gpus_per_actor if gpu else None)
    plan = StagePlan(name, "score", "gpu" if gpu else "cpu", n if gpu else 0, {k: _gib(v) for k, v in memory.items()}, _gib(peak),
                     fits, [note + f"; {actors} actor(s), {len(shapes)} models"])
    if samples is not None:
        flop = sum(2 * sh.matmul_params + 2 * sh.layers * sh.q_dim * mean_tokens for sh in shapes) * samples * mean_tokens
        _timed(plan, flop, a)
    return plan


def _vllm(shape: ModelShape, max_model_len: int, gpu: bool, a: Assumptions, share: float | None):
    """(memory, peak, fits, note) of a vLLM engine on one GPU: weights and KV cache in bf16."""
    weights = 2 * shape.params
    kv_token = shape.kv_bytes_per_token(2)
    need = weights + kv_token * max_model_len + RUNTIME_BYTES
    if not gpu:
        return ({"weights": 4 * shape.params, "kv_cache": 512 << 20}, 4 * shape.params + (512 << 20), None,
                "vLLM on CPU (fp32, a fixed 512 MiB KV cache)")
    reserved = VLLM_GPU_MEMORY_UTILIZATION * min(share or 1.0, 1.0) * a.gpu_memory_gib * GIB
    kv = max(0.0, reserved - weights - RUNTIME_BYTES)
    memory = {"weights": weights, "kv_cache": kv, "runtime": RUNTIME_BYTES}
    note = (f"vLLM reserves {VLLM_GPU_MEMORY_UTILIZATION:.0%} of the GPU; KV cache {kv_token / 1024:.0f} KiB per "
            f"token holds {int(kv // (kv_token * max_model_len))} sequences of {max_model_len} tokens")
    return memory, max(need, reserved), need <= reserved, note


def _eval_stage(name: str, cfg: WMSSConfig, shape: ModelShape, gpu: bool, gpus: int, a: Assumptions) -> StagePlan:
    from wmss.evaluation.benchmarks import default_max_new_tokens

    e = cfg.eval
    budgets = [e.max_new_tokens or default_max_new_tokens(b) for b in e.benchmarks] or [e.max_new_tokens or 4096]
    max_model_len = EVAL_PROMPT_TOKENS + max(budgets)
    if e.backend == "vllm":
        memory, peak, fits, note = _vllm(shape, max_model_len, gpu, a, 1.0)
    else:
        s = 2 if gpu else 4
        memory = {"weights": s * shape.params,
                  "kv_cache": HF_EVAL_BATCH * max_model_len * shape.kv_bytes_per_token(s),
                  "logits": 2 * HF_EVAL_BATCH * shape.vocab * 4, "runtime": RUNTIME_BYTES if gpu else 0}
        peak = sum(memory.values())
        fits = (peak <= a.gpu_memory_gib * GIB) if gpu else None
        note = f"HF generation, batch {HF_EVAL_BATCH} x {max_model_len} tokens"
    return StagePlan(name, "eval", "gpu" if gpu else "cpu", gpus if gpu else 0, {k: _gib(v) for k, v in memory.items()},
                     _gib(peak), fits, [note, "decode is bandwidth-bound: no FLOP-based time"])


def plan_config(cfg: WMSSConfig, a: Assumptions = Assumptions()) -> dict[str, StagePlan]:
    """Every stage of the workflow `cfg` describes (as workflows/wmss_pipeline.py runs them), planned."""
    base = model_shape(cfg.models.base, cfg)
    strong = model_shape(cfg.models.strong, cfg) if cfg.models.strong else base
    weak = model_shape(cfg.models.weak, cfg) if cfg.models.weak else base
    samples = _sample_count(cfg, a)
    mean_tokens = min(a.mean_tokens or DEFAULT_MEAN_TOKENS, cfg.max_length)
    active = None if samples is None else round(samples * cfg.ceda.multiplier)  # an upper bound with dedup
    j = cfg.jtws
    extra = [(model_shape(m.model, cfg), m.trainable) for m in j.extra_models]
    jtws_heads = [(weak, not j.freeze_weak), *extra, (strong, True)]
    jtws_opts = j.training

    stages: dict[str, StagePlan] = {}
    if not cfg.models.strong:
        stages["sft"] = _training_stage("sft", cfg, cfg.sft, [(base, True)], samples,
                                        mean_tokens, a)
    for k in range(1, cfg.rounds + 1):
        stages[f"r{k}.score"] = _score_stage(f"r{k}.score", cfg, [weak, strong], samples, mean_tokens, a)
        stages[f"r{k}.jtws"] = _training_stage(f"r{k}.jtws", cfg, jtws_opts, jtws_heads, active, mean_tokens, a)
    for method in cfg.baselines.methods:
        name = f"baseline.{method}"
        rows = active if method in ACTIVE_SET_BASELINES else samples
        if method in MIX_BASELINES:
            heads = [(strong, True)] if method == "uniform-weak" else jtws_heads
            stages[name] = _training_stage(name, cfg, jtws_opts, heads, rows, mean_tokens, a)
        else:
            update = cfg.baselines.training_update(method)
            stages[name] = _training_stage(name, cfg, cfg.sft.model_copy(update=update), [(strong, True)], rows,
                                           mean_tokens, a)
    # evaluation runs on whatever the cluster has: GPUs when the training stages use them
    gpu_stages = [p for p in stages.values() if p.device == "gpu"]
    gpus = a.gpus or max((p.gpus for p in gpu_stages), default=1)
    for method in dict.fromkeys([*cfg.eval.methods, *cfg.baselines.methods]):
        shape = base if method == "base" else strong
        stages[f"eval.{method}"] = _eval_stage(f"eval.{method}", cfg, shape, bool(gpu_stages), gpus, a)
    for p in stages.values():
        if p.kind == "train" and p.steps is None and samples is None:
            p.notes.append("sample count unknown (pass --samples): no step count or time")
    return stages


def check_fits(cfg: WMSSConfig, gpu_memory_gib: float = 80.0) -> None:
    """Raise ConfigError naming every GPU stage predicted not to fit `gpu_memory_gib` per GPU, with its
    numbers. CPU stages are not checked, and a config without GPU stages is not planned at all (no model
    shapes are looked up)."""
    if not any(t.gpus_per_worker > 0 for t in (cfg.sft, cfg.jtws.training)) and not cfg.scoring.gpus_per_actor:
        return
    try:
        stages = plan_config(cfg, Assumptions(gpu_memory_gib=gpu_memory_gib))
    except ConfigError as err:
        raise ConfigError(f"{err}\nthe GPU memory check needs every model's shape; --force skips it") from None
    over = [p for p in stages.values() if p.fits is False]
    if over:
        lines = [f"stage {p.name}: predicted peak {p.peak_gib} GiB per GPU > {gpu_memory_gib:g} GiB ("
                 + ", ".join(f"{k} {v}" for k, v in p.memory.items() if v) + ")" for p in over]
        raise ConfigError("\n".join(lines + ["see `wmss plan` for the whole plan; --force runs anyway"]))


# ----------------------------------------------------------------------------------------------- CLI


def format_plan(stages: dict[str, StagePlan], a: Assumptions) -> str:
    head = f"{'stage':<18}{'device':>7}{'GPUs':>6}{'peak GiB':>10}{'fits':>6}{'tokens/step':>13}{'steps':>7}{'hours':>8}"
    lines = [head, "-" * len(head)]
    for p in stages.values():
        fits = "-" if p.fits is None else ("yes" if p.fits else "NO")
        lines.append(f"{p.name:<18}{p.device:>7}{p.gpus or '-':>6}{p.peak_gib:>10.1f}{fits:>6}"
                     f"{p.tokens_per_step or '-':>13}{p.steps or '-':>7}{'-' if p.hours is None else p.hours:>8}")
    lines.append("")
    for p in stages.values():
        lines.append(f"{p.name}: " + ", ".join(f"{k} {v}" for k, v in p.memory.items() if v) + " GiB")
        lines.extend(f"  {note}" for note in p.notes)
    lines.append(f"\nGPU memory {a.gpu_memory_gib:g} GiB; time at {a.mfu:.0%} MFU of {a.tflops:g} TFLOP/s per GPU; "
                 "CPU stages show host memory per worker and are not checked")
    return "\n".join(lines)


def add_plan_arguments(parser) -> None:
    add_config_source_arguments(parser)
    parser.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="memory per GPU (default 80)")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="GPUs per GPU stage (default: the config's workers / scoring actors per stage)")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"training samples (default: counted from the data; {PAPER_SAMPLES:,} for the paper's "
                             "hub dataset)")
    parser.add_argument("--mean-tokens", type=int, default=None,
                        help=f"mean tokens per sample for steps and time (default {DEFAULT_MEAN_TOKENS}, capped at "
                             "max_length)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help=f"peak TFLOP/s per GPU (default {DEFAULT_TFLOPS:g}: H100/H200 dense bf16)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOP utilisation (default {DEFAULT_MFU})")
    parser.add_argument("--json", action="store_true", help='print {"stages": {NAME: {"peak_gib": ..., "fits": ...}}}')


def run_plan(args) -> int:
    """`wmss plan`: the plan of every stage, as a table or JSON."""
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--gpus", args.gpus), ("--samples", args.samples),
                        ("--mean-tokens", args.mean_tokens), ("--tflops", args.tflops)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} {value}: must be > 0")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: must be in (0, 1]")
    a = Assumptions(gpu_memory_gib=args.gpu_memory, gpus=args.gpus, samples=args.samples,
                    mean_tokens=args.mean_tokens, tflops=args.tflops, mfu=args.mfu)
    stages = plan_config(load_config(args.config, args.overrides), a)
    if args.json:
        out = {"assumptions": asdict(a), "stages": {n: {k: v for k, v in asdict(p).items() if k != "name"}
                                                   for n, p in stages.items()}}
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(stages, a))
    return 0
