"""Configuration: pydantic models for every stage, validated before any Ray resources are requested.

Errors name the key, the bad value and what is allowed (see `format_validation_error`). YAML (config files,
`--set` values, flags) is read by `load_yaml` alone, which refuses documents whose aliases expand beyond
`YAML_MAX_NODES` nodes (a "billion laughs" config) or refer to themselves, before anything walks them."""

from __future__ import annotations

import argparse
import os
import re
import reprlib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, SerializationInfo, Tag, ValidationError,
                      field_serializer, field_validator, model_validator)

from wmss.errors import ConfigError

# the repository's top-level configs/ folder, shipped inside the package (pyproject.toml's package-dir)
CONFIG_PACKAGE = "wmss.configs"
DEFAULT_CONFIG = "demo"
# the most YAML nodes a config may hold with its aliases expanded: far above any real config (the largest
# shipped one has a few hundred), far below what makes validation or an error message blow up
YAML_MAX_NODES = 10_000
QUOTED_VALUE_CHARS = 200  # an error message quotes at most this much of a bad value


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that measures each document, aliases expanded, before constructing it: the node
    graph is small even when its expansion is astronomic, so the count is cheap (each node counted once)."""

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def expanded(n, path: tuple) -> int:
            where = f"line {n.start_mark.line + 1}, column {n.start_mark.column + 1}"
            if id(n) in path:
                raise yaml.YAMLError(f"an alias refers to a node that contains it ({where}), which expands forever")
            if id(n) not in sizes:
                inner = (*path, id(n))
                children = (n.value if isinstance(n, yaml.SequenceNode) else
                            [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else [])
                sizes[id(n)] = 1 + sum(expanded(c, inner) for c in children)
                if sizes[id(n)] > YAML_MAX_NODES:
                    raise yaml.YAMLError(f"its aliases expand to more than {YAML_MAX_NODES} values ({where}); a "
                                         "config this large is an alias bomb, not settings")
            return sizes[id(n)]

        if node is not None:
            expanded(node, ())
        return node


def load_yaml(text: str):
    """`text` parsed as YAML (safe types only), refusing alias bombs and self-referring aliases with a
    yaml.YAMLError of a few lines."""
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506  (a SafeLoader)


def shorten(value: Any, limit: int = QUOTED_VALUE_CHARS) -> str:
    """`repr(value)` cut to about `limit` characters, for error messages that quote what the user gave."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlevel, short.maxlist, short.maxdict = 4, 20, 20
    text = short.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


class _Strict(BaseModel):
    # unknown keys are errors: a typo must not silently fall back to a default
    # inf/nan are never meaningful settings (an infinite learning rate or CEDA weight trains on garbage)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TrainingConfig(_Strict):
    """One training stage (SFT, JTWS or a baseline): optimisation, batching, parallelism, checkpoints."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "linear", description="decay after the warm-up (authors' code: HF Trainer's linear)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (authors' code: HF Trainer's)")
    grad_clip: float = Field(1.0, ge=0)
    max_length: int | None = Field(None, ge=2, description="token cap; default: the workflow's max_length")
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
    label_smoothing: float | None = Field(None, gt=0, lt=1, description="label smoothing eps (the label-smoothing control)")
    gradient_checkpointing: bool | None = Field(
        None, description="activation checkpointing (non-reentrant) of every trained model; default: on with GPUs")
    loss_filter_eps: float | Literal["auto", "high"] | None = Field(
        None, description="cut-cross-entropy's gradient filter on GPUs; default off: every vocabulary block's "
                          "gradient is computed, small non-target ones included (what JTWS acts on)")

    @model_validator(mode="after")
    def _one_batch_size(self):
        if self.global_batch_tokens is not None and self.global_batch is not None:
            # an explicit token budget wins over the default sample count
            object.__setattr__(self, "global_batch", None)
        if self.global_batch is None and self.global_batch_tokens is None:
            raise ValueError("set `global_batch` (samples) or `global_batch_tokens`")
        return self


class MixModelConfig(_Strict):
    """One more model in JTWS's mix, beside the weak and the strong one."""

    model: str = Field(description="HF folder or hub id; must share the pair's tokenizer")
    weight: float = Field(gt=0, le=1, description="its weight in the mix")
    trainable: bool = Field(False, description="train it too (it is never kept)")


class JTWSConfig(_Strict):
    """Phase 3: joint training of the weak and strong models on mixed logits."""

    lam: float = Field(0.5, ge=0, le=1, description="weight of the STRONG model's logits in the mix")
    freeze_weak: bool = False
    extra_models: list[MixModelConfig] = Field(
        default_factory=list, description="more models in the mix; the weak model's weight is 1 - lam - theirs")

    @model_validator(mode="after")
    def _weights_sum_to_one(self):
        if self.weak_weight < 0:
            raise ValueError(f"lam ({self.lam}) plus the extra models' weights "
                             f"({sum(m.weight for m in self.extra_models)}) exceed 1: the weak model's weight "
                             "1 - lam - extra would be negative")
        return self

    @property
    def weak_weight(self) -> float:
        return 1.0 - self.lam - sum(m.weight for m in self.extra_models)

    def heads(self, weak: str, strong: str) -> list[dict]:
        """The mix, weak first and the kept strong model last: [{model, weight, trainable}]."""
        return [{"model": str(weak), "weight": self.weak_weight, "trainable": not self.freeze_weak},
                *({"model": m.model, "weight": m.weight, "trainable": m.trainable} for m in self.extra_models),
                {"model": str(strong), "weight": self.lam, "trainable": True}]


class DemoConfig(_Strict):
    """The embedded offline demo: a synthetic arithmetic task and a tiny base model pre-trained briefly on
    generated text, used wherever the config says `demo` for the data or the base model."""

    n_train: int = Field(300, ge=4)
    n_eval: int = Field(400, ge=1)
    n_train_eval: int = Field(100, ge=0, description="the first training problems, also evaluated (benchmark "
                                                   "`synthetic-train`): how far training saturated them")
    seed: int = 0
    layers: int = Field(2, ge=1)
    hidden: int = Field(128, ge=64)
    vocab: int = Field(1024, ge=260, description="embedding rows (the task's tokenizer learns ~480 tokens)")
    pretrain_texts: int = Field(4000, ge=1, description="pre-training texts: 30 % chat transcripts, 70 % facts")
    pretrain_steps: int = Field(200, ge=0)
    pretrain_batch: int = Field(32, ge=1)
    pretrain_lr: float = Field(3e-3, gt=0)


class ModelsConfig(_Strict):
    base: str = Field("demo", description="base model M0: HF folder, hub id, or `demo`")
    strong: str | None = Field(None, description="an existing strong model: Phase 1 is skipped")
    weak: str | None = Field(None, description="the weak model (default: the base model)")


class FilterSpec(_Strict):
    """One condition on a record's `field` (a dotted path; integers index lists, -1 the last item:
    `messages.-1.content`). Exactly one test: `equals` a value, `one_of` a list, `regex` (re.search on a
    string), `min` and/or `max` (inclusive, on a number), or `boxed_equals` (the last \\boxed{} answer in the
    field is mathematically equal, by math-verify, to the value at that other path of the same record)."""

    field: str = Field(min_length=1)
    equals: str | int | float | bool | None = None
    one_of: list[str | int | float | bool] | None = None
    regex: str | None = None
    min: float | None = None
    max: float | None = None
    boxed_equals: str | None = Field(None, min_length=1, description="dotted path of the reference answer")
    on_missing: Literal["error", "drop"] = Field(
        "error", description="a record without the field (or the reference): stop with an error, or drop it")

    @model_validator(mode="after")
    def _one_test(self):
        tests = [name for name in ("equals", "one_of", "regex", "boxed_equals") if getattr(self, name) is not None]
        tests += ["min/max"] if self.min is not None or self.max is not None else []
        if len(tests) != 1:
            raise ValueError(f"the filter on {self.field!r} needs exactly one test (equals, one_of, regex, min/max "
                             f"or boxed_equals); it has {', '.join(tests) or 'none'}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"`regex` {self.regex!r} is not a valid regular expression: {err}") from None
        return self


class SourceSpec(_Strict):
    """One source of training records for the `data.select` stage (wmss.datasource)."""

    path: str = Field(min_length=1, description="a .jsonl/.json/.parquet file, a dataset folder, or a hub id")
    subset: str | None = Field(None, description="the dataset's config name (HF `name`)")
    split: str = "train"
    revision: str | None = Field(None, description="hub sources: the commit, tag or branch to read")
    filter: list[FilterSpec] = Field(default_factory=list, description="conditions a record must all meet")
    max_samples: int | None = Field(None, ge=1, description="keep the first N records that pass the filter")
    weight: float | None = Field(None, gt=0, description="in a mix: this source's share of the mixed set")

    @field_validator("filter", mode="before")
    @classmethod
    def _one_filter_is_a_list(cls, value):
        return [value] if isinstance(value, dict) else value


def _train_kind(value: Any) -> str:
    return "path" if isinstance(value, str) else "mix" if isinstance(value, list) else "source"


TrainData = Annotated[Union[Annotated[str, Tag("path")], Annotated[SourceSpec, Tag("source")],
                            Annotated[list[SourceSpec], Tag("mix")]], Discriminator(_train_kind)]


class DataConfig(_Strict):
    train: TrainData = Field("demo", description="training records (.jsonl/.json/.parquet, HF dataset dir or id), "
                                                 "`demo`, or a source spec or a list of them (see `sources`)")
    on_bad_record: Literal["error", "skip"] = "error"

    @model_validator(mode="wrap")
    @classmethod
    def _errors_name_the_key(cls, data, handler):
        """Error locations without the union's tag (`train.spilt`, not `train.source.spilt`)."""
        try:
            return handler(data)
        except ValidationError as err:
            errors = [{**{k: e[k] for k in ("type", "input", "ctx") if k in e},
                       "loc": e["loc"][:1] + e["loc"][2:] if e["loc"][1:2] in (("source",), ("mix",)) else e["loc"]}
                      for e in err.errors()]
            raise ValidationError.from_exception_data(err.title, errors) from None

    @model_validator(mode="after")
    def _weights_all_or_none(self):
        weighted = [s.weight is not None for s in self.sources() or []]
        if any(weighted) and not (all(weighted) and len(weighted) > 1):
            raise ValueError("`train`: a source's weight applies in a mix (a list of two or more sources), and then "
                             "every source needs one; leave them out to take every selected record of each source")
        return self

    def sources(self) -> list[SourceSpec] | None:
        """The sources of a selection (a single spec as a list of one); None when `train` is a plain string
        (a file, folder, hub id or `demo`, read as it is)."""
        if isinstance(self.train, str):
            return None
        return [self.train] if isinstance(self.train, SourceSpec) else self.train


class ActorsConfig(_Strict):
    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max < self.min:
            raise ValueError(f"actors.max ({self.max}) must be >= actors.min ({self.min})")
        return self


class ScoringConfig(_Strict):
    """Phase 2a: entropy of every sample under the weak and the strong model, on Ray Data."""

    backend: Literal["torch", "vllm"] = "torch"
    actors: ActorsConfig = ActorsConfig()
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    top_k: int = Field(20, ge=1, description="vLLM backend: log-probs kept per position")
    token_budget: int = Field(16384, ge=1, description="padded tokens per scoring batch")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="torch backend: the models' dtype (default bfloat16 on GPU, float32 on CPU; the entropy "
                          "is float32 either way)")


class CedaConfig(_Strict):
    """Phase 2b: sampling weights from the entropies and the active-set draw (method.md)."""

    alpha: float = Field(0.1, ge=0)
    beta: float = Field(0.8, ge=0)
    gamma: float = Field(0.1, ge=0)
    formula: Literal["code", "paper-v2"] = "code"
    multiplier: float = Field(1.0, gt=0, description="draws = round(|D| * multiplier)")
    dedup: bool = True
    seed: int = Field(42, description="seed of the active-set draw (authors' code)")
    max_uncertified: float = Field(
        0.05, ge=0, le=1, description="largest share of samples whose vLLM entropy bounds leave the sign of "
                                      "H_strong - H_weak open; above it `select` refuses to draw")


class JTWSStageConfig(JTWSConfig):
    training: TrainingConfig = TrainingConfig()


Baseline = Literal["sft", "neftune", "undial", "ceda-only", "jtws-only", "uniform-weak", "random-weak",
                   "label-smoothing"]
MIX_BASELINES = ("jtws-only", "uniform-weak", "random-weak")  # trained on mixed logits, with JTWS's settings
ACTIVE_SET_BASELINES = ("ceda-only", "uniform-weak", "random-weak")  # trained on round 1's active set
# what `eval.methods` may name: the base model, Phase 1's strong model, the WMSS result, and the baselines
EVAL_METHODS = ("base", "strong", "wmss", *get_args(Baseline))


class BaselinesConfig(_Strict):
    """Equal-budget baselines, each trained from the Phase-1 strong model with JTWS's training settings
    (`jtws.training`: epochs, lr, batch): `sft` (plain), `neftune`, `undial`, the ablations `ceda-only`
    (SFT on round 1's active set) and `jtws-only` (joint training on all the data), and the controls:
    `uniform-weak` (JTWS on round 1's active set with the weak logits replaced by zeros: the strong model
    alone at temperature 1/lam), `random-weak` (JTWS on it with a randomly initialised weak model of the
    same shape) and `label-smoothing` (SFT with label smoothing eps)."""

    methods: list[Baseline] = ["sft"]
    neftune_alpha: float = Field(5.0, gt=0)
    undial_sigma: float = Field(1.0, gt=0)
    label_smoothing: float | None = Field(
        None, gt=0, lt=1, description="eps of the label-smoothing control; default: the mean non-target mass "
                                      "the mix adds at the start of round 1's JTWS (its first step's diagnostics)")

    def training_update(self, method: str) -> dict:
        """What a one-model baseline changes in the SFT settings (label smoothing's default eps is only known
        once JTWS ran: the workflow fills it in)."""
        return {"neftune": {"neftune_alpha": self.neftune_alpha}, "undial": {"undial_sigma": self.undial_sigma},
                "label-smoothing": {"label_smoothing": self.label_smoothing}}.get(method, {})


class EvalConfig(_Strict):
    benchmarks: list[str] = Field(default_factory=list, description="named benchmarks (gsm8k, svamp, ...)")
    heldout: bool = Field(True, description="the demo's held-out split as benchmark `synthetic`")
    data_dir: str | None = None
    limit: int | None = Field(None, ge=1)
    backend: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int | None = Field(None, ge=1)
    methods: list[str] = Field(default_factory=lambda: ["base", "strong", "wmss"],
                               description="which models to evaluate; baselines are always added")

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, names: list[str]) -> list[str]:
        from wmss.evaluation.benchmarks import BENCHMARKS

        return _known("benchmark", names, BENCHMARKS)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, names: list[str]) -> list[str]:
        return _known("method", names, EVAL_METHODS)


def _known(kind: str, names: list[str], allowed) -> list[str]:
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"unknown {kind}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(allowed)}")
    return names


class TuneConfig(_Strict):
    """Ray Tune over lam / alpha / gamma (see `wmss tune`); beta = 1 - alpha - gamma stays on the simplex."""

    num_samples: int = Field(4, ge=1)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    lam: tuple[float, float] = (0.3, 0.7)
    alpha: tuple[float, float] = (0.0, 0.4)
    gamma: tuple[float, float] = (0.0, 0.4)
    search_formula: bool = False
    search_dedup: bool = False
    search_lr: bool = False
    lr: tuple[float, float] = Field((1e-6, 1e-4), description="log-uniform range when search_lr is on")
    seed: int = 0
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the cluster's CPUs/GPUs fit")
    val_data: str | None = Field(None, description="validation records; default: the demo's held-out split")
    val_every: int = Field(0, ge=0, description="optimizer steps between validations; 0 = at the end only")

    @model_validator(mode="after")
    def _ranges(self):
        for name in ("lam", "alpha", "gamma", "lr"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (name != "lr" and high > 1):
                raise ValueError(f"tune.{name} = [{low}, {high}]: need 0 <= low <= high" + (" <= 1" if name != "lr" else ""))
        if self.alpha[1] + self.gamma[1] > 1:
            raise ValueError(f"tune.alpha[1] + tune.gamma[1] = {self.alpha[1] + self.gamma[1]} > 1: beta = "
                             "1 - alpha - gamma would be negative")
        return self


class RayConfig(_Strict):
    address: str | None = Field(None, description="cluster address; default: start or join a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray")


def redact_uri(uri: str) -> str:
    """`uri` without the user info of its authority (`http://user:secret@host/x` -> `http://host/x`)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", uri)


def uri_has_credentials(uri: str | None) -> bool:
    return uri is not None and redact_uri(uri) != uri


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db")
    experiment: str = "wmss"

    @field_serializer("tracking_uri")
    def _no_secrets_in_public_dumps(self, uri: str | None, info: SerializationInfo) -> str | None:
        # what is written or logged (config.yaml, MLflow params) never holds credentials
        public = bool(info.context and info.context.get("public"))
        return redact_uri(uri) if public and uri is not None else uri


class WMSSConfig(_Strict):
    """The whole workflow: Phase 1 SFT, Phase 2 CEDA (score + select), Phase 3 JTWS, baselines, eval."""

    name: str = "wmss"
    run_dir: str | None = Field(None, description="default: runs/<name>")
    seed: int = Field(0, description="the run's seed, added to every stage's own seed (training data order and "
                                     "noise, the CEDA draw): `wmss study` varies it; the demo's data and base "
                                     "model do not depend on it")
    rounds: int = Field(1, ge=1, description="WMSS rounds; in round k+1 the weak model is round k's input strong")
    max_length: int = Field(4096, ge=2, description="token cap for scoring and every training stage")
    models: ModelsConfig = ModelsConfig()
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    sft: TrainingConfig = TrainingConfig()
    scoring: ScoringConfig = ScoringConfig()
    ceda: CedaConfig = CedaConfig()
    jtws: JTWSStageConfig = JTWSStageConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _evaluated_baselines_run(self):
        missing = [m for m in self.eval.methods if m in get_args(Baseline) and m not in self.baselines.methods]
        if missing:
            raise ValueError(f"`eval.methods` names {', '.join(map(repr, missing))}, which `baselines.methods` "
                             f"({self.baselines.methods}) does not train; add it there")
        return self


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=c` strings -> (["a", "b"], value) with the value parsed as YAML (so 0.3 is a float, [sft] a list)."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {shorten(pair)}: expected key=value, e.g. --set jtws.lam=0.4")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {shorten(pair)}: the value is not valid YAML ({err})")
        out.append((key.strip().split("."), value))
    return out


def shipped_configs() -> dict[str, str]:
    """Name (file stem) -> description (its first comment line) of every config shipped in the package."""
    out = {}
    for entry in sorted(resources.files(CONFIG_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = next((line for line in entry.read_text().splitlines() if line.startswith("#")), "#")
            out[entry.name.removesuffix(".yaml")] = first.lstrip("#").strip()
    return out


def config_file(ref: str | os.PathLike | None = None):
    """The YAML file `ref` names: a file path, else the name of a shipped config (`demo`, `qwen3-8b`: see
    `shipped_configs`); None is the demo. Returns a Path or an importlib.resources Traversable."""
    ref = DEFAULT_CONFIG if ref is None else ref
    path = Path(ref)
    if path.is_file():
        return path
    shipped = resources.files(CONFIG_PACKAGE) / f"{ref}.yaml"
    if path.name == str(ref) and shipped.is_file():
        return shipped
    raise ConfigError(f"config {ref}: no such file, and no shipped config of that name "
                      f"({', '.join(shipped_configs())}; `wmss config list`)")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> WMSSConfig:
    """Read a YAML config (a file, or the name of a shipped one; default: the demo), apply `--set`
    overrides, validate. Raises ConfigError with one line per problem."""
    path = DEFAULT_CONFIG if path is None else path
    try:
        raw = load_yaml(config_file(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path}: not valid YAML: {err}")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return config_from_mapping(raw, overrides, f"config {path}")


def config_from_mapping(raw: dict, overrides: list[str] | None = None, where: str = "defaults") -> WMSSConfig:
    """`raw` (a parsed config; {} for every default) with `--set` overrides applied, validated; errors
    start with `where`."""
    for keys, value in parse_overrides(overrides or []):
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {k} is {shorten(child)}, not a section")
            node = child
        node[keys[-1]] = value
    try:
        return WMSSConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where))


def yaml_value(text: str):
    """A flag's value read as YAML, as --set reads it, so that the schema, not argparse, checks it."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not valid YAML ({err})") from None


def add_schema_flags(group, model: type[BaseModel], *, skip: tuple[str, ...] = (), aliases: dict | None = None,
                     exclusive: tuple[str, ...] = ()) -> None:
    """One `--key-name VALUE` flag per field of `model` (dest `set_<field>`, absent unless given), with the
    field's description and default as help: a stage command's flags come from the schema, not a copy of
    it. Fields in `exclusive` are mutually exclusive flags."""
    together = group.add_mutually_exclusive_group() if exclusive else group
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None and "default" in (field.description or "") else f" (default: {default})"
        (together if name in exclusive else group).add_argument(
            f"--{name.replace('_', '-')}", *(aliases or {}).get(name, ()), dest=f"set_{name}", type=yaml_value,
            default=argparse.SUPPRESS, metavar="VALUE", help=f"{(field.description or '').replace('%', '%%')}{shown}".lstrip())


def with_flags(section: BaseModel, given: dict) -> BaseModel:
    """`section` with the flags `given` (field -> value) over it, validated by the section's own schema;
    errors name the flags as typed."""
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "flags").replace("_", "-"))


def given_flags(args) -> dict:
    """The schema flags (`add_schema_flags`) the user gave, by field name."""
    return {k.removeprefix("set_"): v for k, v in vars(args).items() if k.startswith("set_")}


def stage_config(config: str | os.PathLike | None, overrides: list[str] | None = None) -> WMSSConfig:
    """What a single-stage command (`wmss sft`, `jtws`, `score`) starts from: CONFIG with --set applied, or
    without CONFIG the schema's defaults (not the demo's) with --set applied."""
    return load_config(config, overrides) if config else config_from_mapping({}, overrides, "--set")


def public_config(config: WMSSConfig) -> dict:
    """The config as JSON-able data for what is written or logged: credentials in URIs removed (they
    travel as environment variables, e.g. MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
    return config.model_dump(mode="json", context={"public": True})


def dump_config(config: WMSSConfig) -> str:
    """The resolved config as YAML that `load_config` accepts again, without credentials."""
    return yaml.safe_dump(public_config(config), sort_keys=False)


def format_validation_error(err: ValidationError, where: str = "config") -> str:
    """One line per problem: `<where>: key.path = value: message`. A check of a whole section (a model
    validator) names the keys it is about in backticks, relative to its section: they are printed with the
    section's path (`global_batch` under `sft:` as sft.global_batch), and the section's values are not."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = loc or "(top level)"
        value = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(value, dict) else f" = {shorten(value)}"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `wmss config show` prints every key)"
        elif e["type"] == "literal_error":
            msg = f"not allowed; {msg[0].lower()}{msg[1:]}"
        elif isinstance(value, dict) and "`" in msg:
            lines.append(f"{where}: " + re.sub(r"`([^`]+)`", lambda m: f"{loc}.{m[1]}" if loc else m[1], msg))
            continue
        lines.append(f"{where}: {key}{shown}: {msg}")
    return "\n".join(lines)


class _ConfigAction(argparse.Action):
    """The optional CONFIG positional; argparse assigns it (None when absent) after the options too, which
    must not undo a CONFIG that `--set` passed on (_SetAction)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None or getattr(namespace, self.dest, None) is None:
            setattr(namespace, self.dest, values)


class _SetAction(argparse.Action):
    """`--set KEY=VALUE ...` (repeatable). `--set` takes every word up to the next flag, so in
    `wmss run --set a=1 configs/x.yaml` the config lands here: a word without `=` that is a .yaml/.yml
    path or a shipped config's name becomes CONFIG (when none was given before)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        for value in values:
            if ("=" not in value and getattr(namespace, "config", None) is None
                    and (value.endswith((".yaml", ".yml")) or value in shipped_configs())):
                namespace.config = value
            else:
                items.append(value)
        setattr(namespace, self.dest, items)


def add_config_source_arguments(parser, default: str = "the offline demo") -> None:
    """CONFIG and `--set`, as every command that reads a workflow config takes them."""
    parser.add_argument("config", nargs="?", metavar="CONFIG", action=_ConfigAction,
                        help=f"YAML config file, or the name of a shipped one (`wmss config list`); default: {default}")
    parser.add_argument("--set", dest="overrides", action=_SetAction, nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys (each value is read as YAML), e.g. --set jtws.lam=0.4 "
                             "baselines.methods=[sft,neftune]; repeatable, before or after CONFIG")


def add_config_arguments(parser) -> None:
    parser.add_argument("action", choices=["show", "list"],
                        help="show: print the resolved config; list: the shipped configs")
    add_config_source_arguments(parser, "the demo")


def run_config_cli(args) -> int:
    """`wmss config show [CONFIG] [--set ...]`: the validated config with every default filled in;
    `wmss config list`: the shipped configs' names and descriptions."""
    if args.action == "list":
        if args.config or args.overrides:
            raise ConfigError("`wmss config list` takes no CONFIG or --set")
        configs = shipped_configs()
        width = max(map(len, configs))
        print("".join(f"{name:<{width}}  {about}\n" for name, about in configs.items()), end="")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
