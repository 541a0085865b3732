"""SFT and JTWS on Ray Train + DeepSpeed (gloo, CPU) with the tiny model: ZeRO-2 and ZeRO-3, frozen vs
trained weak side, exact resume after the driver is killed, and flag errors before any Ray work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RESUME_FLAGS

from wmss.config import JTWSConfig, TrainingConfig
from wmss.errors import ConfigError
from wmss.plan import build_plan, lr_factor
from wmss.training import sft_heads, train

pytestmark = pytest.mark.ray


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_command(model: Path, data: Path, out: Path, *extra: str, **flags) -> list[str]:
    """`wmss sft` with RESUME_FLAGS (`flags` override them) and `extra` arguments."""
    flags = {**RESUME_FLAGS, **flags}
    return [sys.executable, "-m", "wmss.cli", "sft", "--model", str(model), "--data", str(data), "--out", str(out),
            *(arg for k, v in flags.items() for arg in (f"--{k.replace('_', '-')}", str(v))), *extra]


# ---- pure parts -------------------------------------------------------------------------------------


def test_plan_covers_every_sample_once_per_epoch_and_balances_workers():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=101)
    plan = build_plan(lengths, lengths // 2, world_size=3, epochs=2, seed=1, global_batch=16,
                      global_batch_tokens=None, micro_batch_tokens=600)
    assert np.array_equal(np.sort(plan.sample), np.sort(np.concatenate([np.arange(101)] * 2)))
    assert plan.n_steps == int(np.ceil(202 / 16))
    for s in range(plan.n_steps):
        in_step = plan.step == s
        assert plan.step_tokens[s] == int((lengths[plan.sample[in_step]] // 2).sum())
        for r in range(3):
            mine = in_step & (plan.rank == r)
            assert plan.micro[mine].max(initial=-1) < plan.n_micro[s]
            for m in set(plan.micro[mine].tolist()):
                rows = lengths[plan.sample[mine & (plan.micro == m)]]
                assert rows.max() * rows.size <= 600 or rows.size == 1  # the token budget holds
    again = build_plan(lengths, lengths // 2, world_size=3, epochs=2, seed=1, global_batch=16,
                       global_batch_tokens=None, micro_batch_tokens=600)
    assert all(np.array_equal(getattr(plan, k), getattr(again, k)) for k in ("sample", "step", "rank", "micro"))


def test_token_budget_steps_and_schedule():
    lengths = np.full(40, 10)
    plan = build_plan(lengths, np.full(40, 4), world_size=1, epochs=1, seed=0, global_batch=None,
                      global_batch_tokens=20, micro_batch_tokens=1000)
    assert plan.n_steps == 8 and set(plan.step_tokens) == {20}
    factors = [lr_factor(s, 10, 0.2, "cosine", 0.0) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0 and factors[-1] < 0.05
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert lr_factor(5, 10, 0.0, "linear", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)


def test_stage_cli_settings_are_the_config_section_then_set_then_flags(tmp_path):
    """`wmss sft|jtws [CONFIG] [--set ...] [flags]`: one schema behind config keys and flags."""
    from wmss.cli import build_parser
    from wmss.config import stage_config
    from wmss.training import _training_options

    config = tmp_path / "c.yaml"
    config.write_text("max_length: 512\nsft: {lr: 3.0e-4, global_batch_tokens: 900, zero: 3}\n"
                      "jtws: {lam: 0.3, training: {epochs: 2}}\n")
    base = ["--model", "m", "--data", "d", "--out", "o"]

    def options(argv, section="sft"):
        args = build_parser(argv).parse_args(argv)
        cfg = stage_config(args.config, args.overrides)
        return _training_options(args, cfg, cfg.sft if section == "sft" else cfg.jtws.training)

    got = options(["sft", str(config), "--set", "sft.zero=2", *base, "--lr", "1e-3", "--neftune", "5"])
    assert (got.lr, got.zero, got.global_batch_tokens, got.global_batch, got.max_length, got.neftune_alpha) == (
        1e-3, 2, 900, None, 512, 5.0)
    got = options(["sft", str(config), *base, "--global-batch", "8"])  # a flag's batch size replaces the config's kind
    assert (got.global_batch, got.global_batch_tokens) == (8, None)
    got = options(["sft", *base])  # no CONFIG: the schema's defaults, not the demo's
    assert got == TrainingConfig(max_length=4096)
    got = options(["jtws", "--set", "jtws.training.epochs=3", "--weak", "w", "--strong", "s", "--data", "d",
                   "--out", "o", "--gradient-checkpointing", "true"], section="jtws")
    assert got.epochs == 3 and got.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="flags: zero = 7"):
        options(["sft", *base, "--zero", "7"])


# ---- Ray Train + DeepSpeed ---------------------------------------------------------------------------


def test_sft_zero2_two_workers_writes_a_trained_hf_model(sft_reference, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    report = json.loads((sft_reference / "training.json").read_text())
    assert report["steps"] == 12 and report["metrics"]["final"] == 1
    assert np.isfinite(report["metrics"]["loss"]) and report["metrics"]["grad_norm"] > 0
    assert 0 < report["metrics"]["nontarget_mass_strong"] <= 1
    AutoModelForCausalLM.from_pretrained(sft_reference)  # loads as a plain HF checkpoint
    before, after = _weights(tiny_model_dir), _weights(sft_reference)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_after_killed_driver_equals_uninterrupted(sft_reference, tiny_model_dir, demo_rows, tmp_path):
    """Kill the `wmss sft` driver mid-epoch (after two checkpoints), rerun the same command, and compare
    the final weights with the uninterrupted run. Tolerance: bitwise equal (gloo on CPU is deterministic)."""
    import ray

    data = _write_jsonl(demo_rows, tmp_path / "train.jsonl")
    out = tmp_path / "model"
    cmd = sft_command(tiny_model_dir, data, out, "--ray-address", ray.get_runtime_context().gcs_address)
    checkpoints = tmp_path / "model.checkpoints"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and len(list(checkpoints.glob("checkpoint_*"))) < 3 and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be interrupted"
    assert len(list(checkpoints.glob("checkpoint_*"))) >= 2, "no checkpoint was written before the kill"
    time.sleep(3)  # let Ray reap the killed driver's workers
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout + resumed.stderr
    assert "settings and inputs match the checkpoints'" in resumed.stdout
    want, got = _weights(sft_reference), _weights(out)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_resume_refused_when_settings_or_data_differ(tiny_model_dir, demo_rows, tmp_path):
    """Checkpoints whose record says lr 2e-3 and other data: `wmss sft` with lr 4e-3 refuses before Ray
    (exit 2), naming both differences and how to start over; matching settings and inputs may resume, and
    checkpoints without a record are refused."""
    from wmss.resume import guard_resume
    from wmss.training import _resume_record

    data = _write_jsonl(demo_rows, tmp_path / "train.jsonl")
    checkpoints = tmp_path / "model.checkpoints"
    (checkpoints / "checkpoint_000000").mkdir(parents=True)
    made_with = _resume_record(sft_heads(tiny_model_dir), data, TrainingConfig(**RESUME_FLAGS), None, "error", None, 0)
    assert not guard_resume(checkpoints, *made_with, has_state=False, what="sft", start_over="")  # records them
    assert guard_resume(checkpoints, *made_with, has_state=True, what="sft", start_over="")
    _write_jsonl(demo_rows[:-1], data)  # the data changed since

    t0 = time.time()
    done = subprocess.run(sft_command(tiny_model_dir, data, tmp_path / "model", lr=4e-3), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "training.lr: 0.002 -> 0.004; input data changed" in done.stderr
    assert f"delete {checkpoints} or pass another --out" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Ray" not in done.stderr and time.time() - t0 < 60

    (checkpoints / "wmss-resume.json").unlink()
    with pytest.raises(ConfigError, match="no record of the settings and inputs"):
        guard_resume(checkpoints, *made_with, has_state=True, what="sft", start_over="delete it")


def test_jtws_zero3_trains_both_and_frozen_weak_trains_strong_only(tiny_weak_strong, demo_rows, tmp_path, ray_local):
    from transformers import AutoModelForCausalLM

    weak, strong = tiny_weak_strong
    opts = dict(workers=2, global_batch=8, micro_batch_tokens=512, max_length=256, lr=1e-3)
    both = train(JTWSConfig(lam=0.5).heads(weak, strong), name="jtws", data=demo_rows[:16], out=tmp_path / "both",
                 options=TrainingConfig(zero=3, **opts))
    frozen = train(JTWSConfig(lam=0.5, freeze_weak=True).heads(weak, strong), name="jtws", data=demo_rows[:16],
                   out=tmp_path / "frozen", options=TrainingConfig(zero=2, **opts))
    n_weak = sum(t.numel() for t in _weights(weak).values())
    n_strong = sum(t.numel() for t in _weights(strong).values())
    trainable = {name: json.loads((d / "training.json").read_text())["metrics"]["trainable_params"]
                 for name, d in (("both", both), ("frozen", frozen))}
    assert trainable == {"both": n_weak + n_strong, "frozen": n_strong}
    for folder in (both, frozen):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.hidden_size == 192  # the strong model is what is kept
        assert any(not torch.equal(_weights(strong)[k], _weights(folder)[k]) for k in _weights(strong))
    metrics = json.loads((both / "training.json").read_text())["metrics"]
    assert {"margin_strong", "nontarget_mass_strong", "nontarget_mass_mix", "tokens_per_s"} <= metrics.keys()


def test_bad_flags_fail_before_ray(tiny_weak_strong, demo_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    weak, strong = tiny_weak_strong
    data = _write_jsonl(demo_rows, tmp_path / "train.jsonl")
    empty = tmp_path / "active.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "weight": pa.array([], pa.float64()),
                             "count": pa.array([], pa.int64())}), empty)
    base = [sys.executable, "-m", "wmss.cli", "jtws", "--data", str(data), "--out", str(tmp_path / "o")]
    cases = {
        "lam = 1.5": base + ["--weak", str(weak), "--strong", str(strong), "--lam", "1.5"],
        "--weak": base + ["--weak", str(tmp_path / "nope"), "--strong", str(strong)],
        "active set is empty": base + ["--weak", str(weak), "--strong", str(strong), "--active", str(empty)],
    }
    for expected, cmd in cases.items():
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert expected in done.stderr, done.stderr[-2000:]
        assert "Ray" not in done.stderr and time.time() - t0 < 60
