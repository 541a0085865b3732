"""`wmss plan` (wmss.capacity): the activation model against memory measured on CPU, the ZeRO arithmetic,
the shipped paper configs fitting 8 x 80 GB offline, and the fit check that `wmss run` and `wmss submit` use."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from wmss.capacity import (KNOWN_SHAPES, Assumptions, ModelShape, check_fits, model_shape, plan_config,
                           shape_from_config)
from wmss.cli import main
from wmss.config import load_config
from wmss.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("plan_activations", REPO / "benchmarks" / "plan_activations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case,dtype", [
    ((2, 128, 2, 1, 384, 2048, 4, 64), torch.float32),  # one kv head: no repeated k/v
    ((4, 256, 4, 2, 768, 4096, 3, 128), torch.float32),
    ((3, 384, 6, 2, 1024, 8192, 2, 256), torch.float32),
    ((4, 256, 4, 2, 768, 4096, 3, 128), torch.bfloat16),  # RMSNorm's fp32 copies are real copies
])
def test_activation_model_matches_measured_memory_with_and_without_checkpointing(case, dtype):
    result = _bench().compare(case, dtype)
    for key in ("no_ckpt", "ckpt", "layer"):
        assert abs(result["ratio"][key] - 1) <= 0.25, (key, result)  # measured: within 1 % (README)
    # checkpointing is worth it even at two layers: the plan must see the difference the GPU will
    assert result["measured"]["ckpt_kept"] < 0.5 * result["measured"]["no_ckpt"]


def test_known_shapes_have_the_published_parameter_counts():
    assert round(KNOWN_SHAPES["Qwen/Qwen3-8B-Base"].params / 1e9, 2) == 8.19
    assert round(KNOWN_SHAPES["Qwen/Qwen3-4B-Base"].params / 1e9, 2) == 4.02
    assert round(KNOWN_SHAPES["smollm2-135m-instruct"].params / 1e6) == 135


def test_shape_from_a_model_folder(tmp_path):
    config = {"model_type": "qwen3", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(str(tmp_path), load_config("demo"))
    assert shape == shape_from_config(config) == ModelShape(256, 768, 4, 4, 2, 64, 4096, True)


def test_unknown_model_without_hub_is_a_config_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ConfigError, match="no-such/model"):
        model_shape("no-such/model", load_config("demo"))


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-4b"])
def test_paper_configs_fit_8x80gb_offline(name, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("hub access"))
    cfg = load_config(name)
    check_fits(cfg, 80)
    stages = plan_config(cfg)
    assert list(stages) == ["sft", "r1.score", "r1.jtws", "baseline.sft", "eval.base", "eval.strong", "eval.wmss",
                            "eval.sft"]
    assert all(p.fits and p.device == "gpu" and p.peak_gib < 80 for p in stages.values())
    jtws = stages["r1.jtws"]
    # the pair's ZeRO-3 states: 18 B per parameter over 8 GPUs
    params = 2 * KNOWN_SHAPES[cfg.models.base].params
    states = sum(jtws.memory[k] for k in ("weights", "gradients", "optimizer"))
    assert states == pytest.approx(18 * params / 8 / 2**30, rel=0.01)
    assert jtws.tokens_per_step == 512 * 2048 and jtws.steps == 219 and jtws.hours > 0
    assert stages["r1.score"].memory["output_layer_fp32"] > 0 and "kv_cache" in stages["eval.base"].memory


def test_zero_stages_partition_what_they_should():
    cfg = load_config("qwen3-8b")
    p = KNOWN_SHAPES["Qwen/Qwen3-8B-Base"].params / 2**30
    # bf16 gradients accumulate in fp32 under ZeRO 1-3 (wmss.train_loop.deepspeed_config), in bf16 under ZeRO-0
    for zero, (weights, grads, optim) in {0: (2, 2, 12), 1: (2, 4, 12 / 8), 2: (2, 4 / 8, 12 / 8),
                                           3: (2 / 8, 4 / 8, 12 / 8)}.items():
        sft = plan_config(load_config("qwen3-8b", [f"sft.zero={zero}"]))["sft"]
        assert sft.memory["weights"] == pytest.approx(weights * p, rel=0.01), zero
        assert sft.memory["gradients"] == pytest.approx(grads * p, rel=0.01), zero
        assert sft.memory["optimizer"] == pytest.approx(optim * p, rel=0.01), zero
    frozen = plan_config(cfg.model_copy(update={"jtws": cfg.jtws.model_copy(update={"freeze_weak": True})}))["r1.jtws"]
    assert frozen.memory["optimizer"] == pytest.approx(plan_config(cfg)["sft"].memory["optimizer"], rel=0.01)


def test_check_fits_names_the_stage_and_the_numbers():
    with pytest.raises(ConfigError) as err:
        check_fits(load_config("qwen3-8b", ["jtws.training.gradient_checkpointing=false"]), 80)
    message = str(err.value)
    assert "stage r1.jtws: predicted peak" in message and "> 80 GiB" in message and "activations" in message
    assert "stage sft" not in message and "--force" in message


def test_cpu_stages_are_planned_in_host_memory_and_never_refused():
    cfg = load_config("demo")
    stages = plan_config(cfg, Assumptions(gpu_memory_gib=0.001))
    assert stages and all(p.device == "cpu" and p.fits is None for p in stages.values())
    check_fits(cfg, 0.001)


def test_plan_command_json(capsys):
    assert main(["plan", "qwen3-8b", "--json", "--gpus", "16", "--gpu-memory", "40"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert {"peak_gib", "fits", "memory", "tokens_per_step", "hours"} <= set(stages["r1.jtws"])
    by_ckpt = stages["r1.jtws"]["peak_gib_by_checkpointing"]
    assert by_ckpt["on"] == stages["r1.jtws"]["peak_gib"] < by_ckpt["off"]
    assert stages["sft"]["gpus"] == 16
    assert main(["plan", "qwen3-8b", "--mfu", "2"]) == 2


# ---- the guard of `wmss run` and `wmss submit` --------------------------------------------------------------

_OVER = ["--set", "jtws.training.gradient_checkpointing=false"]  # the 8B pair without checkpointing: 106 GiB


def test_run_refuses_a_config_that_does_not_fit_before_any_ray_resource(monkeypatch, capsys):
    import workflows.wmss_pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_workflow", lambda *a, **k: pytest.fail("the workflow started"))
    assert main(["run", "qwen3-8b", *_OVER]) == 2
    err = capsys.readouterr().err
    assert "wmss run: stage r1.jtws: predicted peak" in err and "--force" in err


def test_run_force_skips_the_guard(monkeypatch, tmp_path):
    import workflows.wmss_pipeline as pipeline

    started = []
    monkeypatch.setattr(pipeline, "run_workflow", lambda *a, **k: started.append(1) or {})
    assert main(["run", "qwen3-8b", *_OVER, "--force", "--run-dir", str(tmp_path / "run")]) == 0
    assert started


def test_submit_refuses_before_contacting_the_cluster_and_forwards_force(monkeypatch, capsys):
    import wmss.submit as submit

    monkeypatch.setattr(submit, "_connect", lambda address: pytest.fail("contacted the cluster"))
    overrides = [*_OVER, "run_dir=s3://bucket/wmss"]
    assert main(["submit", "qwen3-8b", *overrides, "--address", "http://head:8265"]) == 2
    assert "wmss submit: stage r1.jtws: predicted peak" in capsys.readouterr().err
    forced = submit.build_submission("qwen3-8b", overrides[1:], "run-1", root=REPO, environ={}, force=True)
    assert "--force" in forced.entrypoint.split()
    plain = submit.build_submission("qwen3-8b", overrides[1:], "run-1", root=REPO, environ={})
    assert "--force" not in plain.entrypoint.split()
