"""The training pieces below Ray: the objective over any number of weighted models, activation
checkpointing, the exactness of the fused loss on peaked (SFT-like) logits, the DeepSpeed config a GPU run
gets, and the per-worker loop run under plain torch.distributed (gloo, no Ray): a third model in the mix
as a config change, ZeRO-3 models constructed partitioned, the exported model in the training dtype."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from wmss.config import JTWSConfig, TrainingConfig
from wmss.losses import IGNORE_INDEX, fused_mixture_cross_entropy, mixture_cross_entropy
from wmss.models import final_hidden, load_causal_lm, make_tiny_model, output_weight
from wmss.objective import MixObjective
from wmss.train_loop import deepspeed_config, gradient_checkpointing, train_dtype


def _batch(n_rows: int = 3, width: int = 24, vocab: int = 400, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_rows, width), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, width - 5:] = 0  # one padded row
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # a prompt
    labels[mask == 0] = IGNORE_INDEX
    return ids, mask, labels


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return [make_tiny_model(root / "weak", seed=1), make_tiny_model(root / "extra", seed=3),
            make_tiny_model(root / "strong", seed=2, hidden=192, heads=3)]


# ---- the objective ---------------------------------------------------------------------------------


def test_objective_with_three_heads_is_the_cross_entropy_of_the_mixed_logits(three_models):
    """Loss and every gradient of a three-model mix equal a plain full-logit reference."""
    weights = [0.3, 0.2, 0.5]
    models = [load_causal_lm(p) for p in three_models]
    ids, mask, labels = _batch()
    objective = MixObjective(models, weights, trainable=[True, False, True])
    loss_sum, loss, _ = objective(ids, mask, labels, scale=1.0, noise_seed=0)
    loss.backward()
    got = {f"{k}.{n}": p.grad.clone() for k, m in enumerate(models) for n, p in m.named_parameters()
           if p.grad is not None}
    assert not any(n.startswith("1.") for n in got), "the frozen middle model got gradients"

    refs = [load_causal_lm(p) for p in three_models]
    refs[1].requires_grad_(False)
    logits = sum(w * (final_hidden(m, ids, mask) @ output_weight(m).t()) for w, m in zip(weights, refs))
    want_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                                  reduction="sum")
    want_loss.backward()
    assert float(loss_sum) == pytest.approx(float(want_loss), rel=1e-5)
    want = {f"{k}.{n}": p.grad for k, m in enumerate(refs) for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_objective_refuses_noise_on_a_mix_and_a_frozen_kept_model(three_models):
    models = [load_causal_lm(p) for p in three_models[:2]]
    with pytest.raises(ValueError, match="NEFTune and UNDIAL"):
        MixObjective(models, [0.5, 0.5], neftune_alpha=5.0)
    with pytest.raises(ValueError, match="kept"):
        MixObjective(models, [0.5, 0.5], trainable=[True, False])


def test_jtws_config_builds_the_mix_weak_first_strong_last():
    heads = JTWSConfig(lam=0.5, freeze_weak=True, extra_models=[{"model": "x", "weight": 0.2}]).heads("w", "s")
    assert [(h["model"], round(h["weight"], 6), h["trainable"]) for h in heads] == [
        ("w", 0.3, False), ("x", 0.2, False), ("s", 0.5, True)]
    with pytest.raises(ValueError, match="exceed 1"):
        JTWSConfig(lam=0.9, extra_models=[{"model": "x", "weight": 0.2}])


# ---- activation checkpointing ----------------------------------------------------------------------


def _saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the tensors autograd keeps for backward while `fn` runs its forward (what activation
    checkpointing trades for recomputation)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def test_gradient_checkpointing_gives_equal_gradients_with_less_saved_activation(tmp_path):
    path = make_tiny_model(tmp_path / "deep", seed=4, layers=4)
    ids, mask, labels = _batch(n_rows=4, width=64)
    grads, saved = {}, {}
    for on in (False, True):
        model = load_causal_lm(path)
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        objective = MixObjective([model], [1.0]).train()
        saved[on], (_, loss, _) = _saved_bytes(lambda: objective(ids, mask, labels, scale=1.0, noise_seed=0))
        loss.backward()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert saved[True] < 0.25 * saved[False], saved  # measured: 9.4 % at 4 layers


def test_checkpointing_and_dtype_defaults_follow_the_device():
    opts = TrainingConfig()
    assert gradient_checkpointing(opts, use_gpu=True) and not gradient_checkpointing(opts, use_gpu=False)
    assert not gradient_checkpointing(TrainingConfig(gradient_checkpointing=False), use_gpu=True)
    assert train_dtype(opts, True) == torch.bfloat16 and train_dtype(opts, False) == torch.float32


# ---- the fused loss on peaked logits -----------------------------------------------------------------


def _peaked(n: int, dim: int, vocab: int, seed: int, labels=None):
    """Features whose target probability is above 0.99, as late in SFT: h = 16 w_y / |w_y|^2 + noise (the
    target logit is 16, the others ~ N(0, 16 / |w_y|) = N(0, 2) at dim 64)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    if labels is None:
        labels = torch.randint(0, vocab, (n,), generator=gen)
        labels[::7] = IGNORE_INDEX
    y = labels.clamp(min=0)
    hidden = 16 * weight[y] / weight[y].pow(2).sum(-1, keepdim=True)
    return hidden + 0.01 * torch.randn(n, dim, generator=gen, dtype=torch.float64), weight, labels


def test_fused_and_chunked_losses_are_exact_on_peaked_logits():
    """cut-cross-entropy's fused loss (its torch_compile implementation runs on CPU) and the chunked loss,
    for one head (SFT) and two (JTWS), against a float64 full-logit reference on the same inputs: every
    gradient, the tiny non-target ones a saturated model has included, is as close to it as a float32
    full-logit computation gets, and no non-target row gets exactly zero."""
    n, vocab, lam = 96, 512, 0.4
    h_w, w_w, labels = _peaked(n, 64, vocab, seed=1)
    h_s, w_s, _ = _peaked(n, 64, vocab, seed=2, labels=labels)
    valid = labels != IGNORE_INDEX
    p_target = torch.softmax(h_s @ w_s.t(), -1)[valid, labels[valid]]
    assert float(p_target.mean()) > 0.99  # the regime under test
    nontarget_rows = torch.ones(vocab, dtype=torch.bool).index_fill_(0, labels[valid], False)

    def full_logits(heads):
        return torch.nn.functional.cross_entropy(sum(c * (h @ w.t()) for c, h, w in heads), labels,
                                                 ignore_index=IGNORE_INDEX, reduction="sum")

    implementations = {
        "float32 full logits": full_logits,
        "fused": lambda heads: fused_mixture_cross_entropy(heads, labels, reduction="sum", impl="torch_compile"),
        "chunked": lambda heads: mixture_cross_entropy(heads, labels, reduction="sum", chunk_rows=32),
    }
    for heads32 in ([(1.0, h_s, w_s)], [(1 - lam, h_w, w_w), (lam, h_s, w_s)]):
        inputs = [t.float() for _, h, w in heads32 for t in (h, w)]
        coefs = [c for c, _, _ in heads32]

        def grads(fn, dtype):
            leaves = [t.to(dtype).clone().requires_grad_(True) for t in inputs]
            fn([(c, leaves[2 * i], leaves[2 * i + 1]) for i, c in enumerate(coefs)]).backward()
            return [t.grad.double() for t in leaves]

        reference = grads(full_logits, torch.float64)
        errors = {}
        for name, fn in implementations.items():
            got = grads(fn, torch.float32)
            errors[name] = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, reference))
            assert bool((got[-1][nontarget_rows] != 0).all()), f"{name}: a non-target row got exactly zero gradient"
        floor = errors["float32 full logits"]
        assert errors["fused"] <= 1.5 * floor and errors["chunked"] <= 1.5 * floor, (len(coefs), errors)
        # the chunked loss keeps the max apart and uses log1p/expm1: far better than float32 full logits here
        assert errors["chunked"] < 2e-5, (len(coefs), errors)


def test_gradient_filter_is_off_unless_configured():
    import inspect

    assert inspect.signature(mixture_cross_entropy).parameters["filter_eps"].default is None
    assert inspect.signature(fused_mixture_cross_entropy).parameters["filter_eps"].default is None
    assert TrainingConfig().loss_filter_eps is None
    assert TrainingConfig(loss_filter_eps="high").loss_filter_eps == "high"


# ---- DeepSpeed as a GPU run gets it ------------------------------------------------------------------


def test_deepspeed_config_on_gpus_overlaps_and_accumulates_in_fp32():
    gpu = deepspeed_config(TrainingConfig(zero=3), use_gpu=True, hidden_size=4096)
    zero = gpu["zero_optimization"]
    assert zero["overlap_comm"] and gpu["bf16"]["enabled"] and gpu["data_types"] == {"grad_accum_dtype": "fp32"}
    assert zero["reduce_bucket_size"] == 4096 ** 2 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2)
    assert zero["stage3_param_persistence_threshold"] == 10 * 4096
    assert gpu["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's fused Adam on GPUs
    cpu = deepspeed_config(TrainingConfig(zero=2), use_gpu=False, hidden_size=128)
    assert not cpu["zero_optimization"]["overlap_comm"] and not cpu["bf16"]["enabled"] and "data_types" not in cpu
    # ZeRO-0 with bf16 has no fp32 accumulation path in DeepSpeed: not asked for
    assert "data_types" not in deepspeed_config(TrainingConfig(zero=0), use_gpu=True, hidden_size=128)


# ---- the loop under plain torch.distributed ---------------------------------------------------------


@pytest.fixture
def single_process_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    yield


def test_three_model_mix_trains_under_plain_torch_distributed(three_models, demo_rows, tmp_path, single_process_group):
    """A third model in the mix is a config change: JTWS over weak + extra + strong, ZeRO-3 (models
    constructed partitioned), bf16 weights with fp32 gradient accumulation, activation checkpointing, no
    Ray. The kept model is the strong one, saved in bf16 as safetensors that transformers loads."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from wmss.training import train_plain

    weak, extra, strong = three_models
    cfg = JTWSConfig(lam=0.5, extra_models=[{"model": str(extra), "weight": 0.2}])
    opts = TrainingConfig(workers=1, zero=3, bf16=True, gradient_checkpointing=True, global_batch=8,
                          micro_batch_tokens=512, max_length=256, lr=1e-3, checkpoint_every=1)
    out = train_plain(cfg.heads(weak, strong), name="jtws", data=demo_rows[:16], root=tmp_path / "run",
                      options=opts, validation=demo_rows[16:20])
    lines = [json.loads(line) for line in (tmp_path / "run" / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    final = lines[-1]
    n_params = {p: sum(t.numel() for t in load_causal_lm(p).parameters()) for p in three_models}
    assert final["final"] == 1 and final["trainable_params"] == n_params[weak] + n_params[strong]
    assert final["val_loss"] > 0 and final["grad_norm"] > 0
    assert [line["step"] for line in lines] == [1, 2]
    shards = sorted(out.glob("*.safetensors"))
    assert shards
    with safe_open(str(shards[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 192 and model.dtype == torch.bfloat16
    before = load_causal_lm(strong)
    assert any(not torch.equal(a.to(torch.bfloat16), b) for a, b in zip(before.parameters(), model.parameters()))


def test_zero3_constructs_the_models_partitioned(tiny_model_dir, single_process_group):
    from wmss.train_loop import init_distributed, load_models, shutdown_distributed

    started = init_distributed()
    try:
        ds_config = deepspeed_config(TrainingConfig(zero=3), use_gpu=False, hidden_size=128)
        (model,), handle = load_models([str(tiny_model_dir)], torch.float32, ds_config)
        assert handle is not None
        params = list(model.parameters())
        assert all(hasattr(p, "ds_id") for p in params), "ZeRO-3 should construct the model partitioned"
        del handle  # models loaded after this are whole again
        reference = load_causal_lm(tiny_model_dir)
        assert sum(p.ds_numel for p in params) == sum(p.numel() for p in reference.parameters())
    finally:
        if started:
            shutdown_distributed()


def test_plain_torch_distributed_resumes_from_its_last_checkpoint(tiny_model_dir, demo_rows, tmp_path,
                                                                  single_process_group):
    """A finished plain run restarted on the same folder reports its final checkpoint without retraining;
    checkpoints are folders renamed into place (no staging folder left behind)."""
    from wmss.training import sft_heads, train_plain

    opts = TrainingConfig(workers=1, zero=2, global_batch=8, micro_batch_tokens=512, max_length=256, lr=1e-3,
                          checkpoint_every=1)
    root = tmp_path / "run"
    first = train_plain(sft_heads(tiny_model_dir), name="sft", data=demo_rows, root=root, options=opts)
    stamp = (first / "config.json").stat().st_mtime_ns
    again = train_plain(sft_heads(tiny_model_dir), name="sft", data=demo_rows, root=root, options=opts)
    assert again == first and (again / "config.json").stat().st_mtime_ns == stamp
    assert not list(Path(root / "checkpoints").glob(".staging*"))


def test_a_non_finite_loss_stops_the_stage_naming_step_and_value(tiny_model_dir, demo_rows, tmp_path,
                                                                 single_process_group):
    """An absurd (finite) learning rate blows the weights up after step 1: step 2's loss is not finite, and the
    stage stops there instead of saving a model."""
    from wmss.errors import NonFiniteError
    from wmss.training import sft_heads, train_plain

    opts = TrainingConfig(workers=1, zero=2, global_batch=8, micro_batch_tokens=512, max_length=256, lr=1e30,
                          warmup_ratio=0, grad_clip=0)
    with pytest.raises(NonFiniteError, match=r"sft: step 2: the loss is (nan|inf)"):
        train_plain(sft_heads(tiny_model_dir), name="sft", data=demo_rows, root=tmp_path / "run", options=opts)
    assert not list((tmp_path / "run" / "checkpoints").glob("checkpoint_*/hf_model"))


def test_config_refuses_non_finite_values():
    with pytest.raises(ValueError, match="finite"):
        TrainingConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        JTWSConfig(lam=float("nan"))


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from wmss.train_loop import _rng_state, _set_rng_state

    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()
    torch.save(_rng_state(), tmp_path / "rng.pt")
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    assert want[:3] == got[:3] and torch.equal(want[3], got[3])


def test_zero0_reports_the_gradient_norm_before_clipping(tiny_model_dir, demo_rows, tmp_path, single_process_group):
    """ZeRO-0 in fp32 (DeepSpeed keeps no norm there): the step's reported gradient norm is the total norm of
    the gradient of the step's loss (token-mean CE over the batch), computed here without DeepSpeed."""
    from wmss.losses import linear_cross_entropy
    from wmss.models import load_tokenizer
    from wmss.plan import collate
    from wmss.training import prepare, sft_heads, train_plain

    rows = demo_rows[:8]
    opts = TrainingConfig(workers=1, zero=0, global_batch=8, micro_batch_tokens=4096, max_length=256, lr=1e-3,
                          grad_clip=0.5)
    train_plain(sft_heads(tiny_model_dir), name="sft", data=rows, root=tmp_path / "run", options=opts)
    final = json.loads((tmp_path / "run" / "checkpoints" / "metrics.jsonl").read_text().splitlines()[-1])

    _, tables, _ = prepare(sft_heads(tiny_model_dir), name="sft", data=rows, options=opts)
    batch = tables["train"].to_pydict()
    assert set(batch["step"]) == {0}
    model = load_causal_lm(tiny_model_dir)
    ids, mask, labels = collate([{"input_ids": i, "labels": l} for i, l in zip(batch["input_ids"], batch["labels"])],
                                load_tokenizer(tiny_model_dir).pad_token_id)
    hidden = final_hidden(model, ids, mask)[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    loss = linear_cross_entropy(hidden[keep], output_weight(model), target[keep])  # token mean
    loss.backward()
    want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert want > opts.grad_clip  # so clipping acted, and the norm reported is the one before it
    assert final["grad_norm"] == pytest.approx(float(want), rel=1e-4)
