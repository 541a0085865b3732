"""wmss.scoring: token-budget packing, the exact torch scorer (float32 and bfloat16 models) and the vLLM
top-K scorer against full-logit references, the backend interface and the certification of ΔH's sign,
argument checks before Ray, and the Ray Data job (both backends, resume)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from wmss.cli import main as wmss_main
from wmss.data import load_records, tokenize_records
from wmss.errors import ConfigError, InputError
from wmss.io import write_parquet
from wmss.losses import entropy_bounds_from_topk
from wmss.models import final_hidden, load_causal_lm, load_tokenizer, make_tiny_model, output_weight
from wmss.scoring import (
    Scorer,
    ScoringBackend,
    TorchBackend,
    VllmBackend,
    batch_tables,
    certify,
    collate,
    pack_by_token_budget,
    prepare_scoring,
    run_scoring,
    score_batch,
    score_entropy,
    scoring_dtype,
    topk_sample_entropy,
)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # float32 entropies of ~V=2048 terms, computed by different kernels (HF vs vLLM)


def _peaked_copy(source: Path, target: Path, scale: float) -> Path:
    """The model with its output layer scaled: randomly initialised logits are nearly uniform, which would
    make every entropy ~ln V and every top-K bound trivially tight."""
    model = load_causal_lm(source)
    with torch.no_grad():
        output_weight(model).mul_(scale)
    model.save_pretrained(target)
    load_tokenizer(source).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def models(tiny_weak_strong, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scoring-models")
    weak, strong = tiny_weak_strong
    return {"weak": _peaked_copy(weak, root / "weak", 20.0), "strong": _peaked_copy(strong, root / "strong", 40.0)}


@pytest.fixture(scope="module")
def data_file(demo_rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scoring-data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows))
    return path


def _reference_entropy(model, input_ids: list[int], prompt_length: int) -> float:
    """Plain reference: the full (T, V) logits of one unpadded sample, entropy in float64 of each row that
    predicts a completion token, averaged."""
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0].double()
    logp = logits[prompt_length - 1:len(input_ids) - 1].log_softmax(dim=-1)
    return float(-(logp.exp() * logp).sum(dim=-1).mean())


@pytest.fixture(scope="module")
def reference(models, data_file) -> dict[str, np.ndarray]:
    """Full-logit reference entropies of every demo sample, in data order, per model."""
    records, _ = load_records(data_file)
    samples, _ = tokenize_records(records, load_tokenizer(models["weak"]))
    out = {"id": [s["id"] for s in samples], "n_completion_tokens": [s["n_completion_tokens"] for s in samples]}
    for name, path in models.items():
        model = load_causal_lm(path).eval()
        out[name] = np.array([_reference_entropy(model, s["input_ids"], s["labels"].count(-100)) for s in samples])
    return out


# ------------------------------------------------------------------------------------------ pure core


def test_pack_by_token_budget_buckets_lengths_under_the_budget():
    rng = np.random.default_rng(0)
    for budget in (64, 500, 4096):
        lengths = rng.integers(1, 700, size=300)
        batches = pack_by_token_budget(lengths, budget)
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(300))  # every sample exactly once
        for batch in batches:
            assert len(batch) == 1 or len(batch) * lengths[batch].max() <= budget
        for batch in batches[:-1]:  # packed full, not just under the budget; the last takes what is left
            assert len(batch) == max(1, budget // lengths[batch].max())
        for longer, shorter in zip(batches, batches[1:]):  # buckets: consecutive in length order
            assert lengths[longer].min() >= lengths[shorter].max()
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        pack_by_token_budget([3, 4], 0)


def test_score_batch_matches_full_logits_on_random_padded_batches(models):
    model = load_causal_lm(models["strong"]).eval()
    vocab = output_weight(model).shape[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        lengths = torch.randint(2, 60, (5,), generator=gen).tolist()
        tokens = [torch.randint(0, vocab, (n,), generator=gen).numpy().astype(np.int32) for n in lengths]
        prompt_lengths = [int(torch.randint(1, n, (1,), generator=gen)) for n in lengths]
        batch = collate(tokens, prompt_lengths)
        assert batch["input_ids"].shape == (5, max(lengths))
        got = score_batch(model, output_weight(model), batch)
        want = [_reference_entropy(model, t.tolist(), p) for t, p in zip(tokens, prompt_lengths)]
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_score_batch_of_a_bfloat16_model_is_the_float32_entropy_of_its_hidden_states(models):
    """A bfloat16 model (the GPU default) gets float32 logits and entropies, not bfloat16-rounded logits."""
    model = load_causal_lm(models["strong"], dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(2)
    tokens = [torch.randint(0, output_weight(model).shape[0], (n,), generator=gen).numpy() for n in (30, 17, 44)]
    batch = collate(tokens, [5, 9, 2])
    got = score_batch(model, output_weight(model), batch)
    with torch.no_grad():
        hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"]).double()
        logp = (hidden @ output_weight(model).double().t()).log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    mask = batch["labels"][:, 1:] != -100
    want = (entropy[:, :-1] * mask).sum(dim=1) / mask.sum(dim=1)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)  # bf16 logits would miss by ~1e-2


def test_scoring_dtype_is_bfloat16_on_gpus_float32_on_cpu_unless_set():
    assert scoring_dtype("cpu") == torch.float32
    assert scoring_dtype("cuda") == scoring_dtype("cuda:3") == torch.bfloat16
    assert scoring_dtype("cuda", "float32") == torch.float32 and scoring_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(ConfigError, match="scoring dtype must be one of"):
        scoring_dtype("cuda", "int8")
    cpu, gpu = TorchBackend(gpus_per_actor=0), TorchBackend(gpus_per_actor=1)  # building one loads nothing
    assert (cpu.device, cpu.dtype, gpu.device, gpu.dtype) == ("cpu", torch.float32, "cuda", torch.bfloat16)
    assert cpu.key(None) != gpu.key(None)  # a dtype change rescoring, not resuming, the parts
    with pytest.raises(ConfigError, match="runs its model on one device"):
        TorchBackend(gpus_per_actor=2)


def _flat_prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int):
    """vLLM's FlatLogprobs for one prompt, built with vLLM's own append function as its engine does:
    per position t >= 1 the predicted token with its rank, then the top-k of the row predicting it."""
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs

    flat = create_prompt_logprobs(flat_logprobs=True)
    logp = logits.float().log_softmax(dim=-1)
    for t in range(1, len(prompt_ids)):
        row, token = logp[t - 1], prompt_ids[t]
        top = torch.topk(row, k)
        rank = int((row > row[token]).sum()) + 1
        append_logprobs_for_next_position(flat, [token] + top.indices.tolist(),
                                          [float(row[token])] + top.values.tolist(), [None] * (k + 1), rank, k)
    return flat


def test_topk_sample_entropy_matches_bounds_and_exact_entropy():
    gen = torch.Generator().manual_seed(1)
    vocab, length, prompt_length = 300, 40, 11
    logits = torch.randn(length, vocab, generator=gen) * 4
    ids = torch.randint(0, vocab, (length,), generator=gen)
    ids[15] = logits[14].argmax()  # one completion token inside the top K, so its entry is a duplicate
    ids = ids.tolist()
    rows = logits[prompt_length - 1:length - 1].float().log_softmax(dim=-1)
    exact = float(-(rows.exp() * rows).sum(dim=-1).mean())

    estimate, lower, upper = topk_sample_entropy(_flat_prompt_logprobs(logits, ids, vocab), prompt_length, vocab, vocab)
    assert estimate == pytest.approx(exact, abs=1e-5) and lower == pytest.approx(exact, abs=1e-5)
    assert upper == pytest.approx(exact, abs=1e-5)
    for k in (1, 5, 20):
        estimate, lower, upper = topk_sample_entropy(_flat_prompt_logprobs(logits, ids, k), prompt_length, k, vocab)
        want = [float(v.double().mean()) for v in entropy_bounds_from_topk(torch.topk(rows, k).values, vocab)]
        np.testing.assert_allclose([estimate, lower, upper], want, rtol=1e-6)
        assert lower < exact < upper
    with pytest.raises(ValueError, match="fewer than top_k=6 log-probs"):
        topk_sample_entropy(_flat_prompt_logprobs(logits, ids, 5), prompt_length, 6, vocab)


def test_certify_needs_disjoint_intervals():
    lower_weak, upper_weak = np.array([1.0, 1.0, 1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0, 2.0, 2.0])
    lower_strong = np.array([2.5, 0.2, 1.5, 0.5, 2.0])  # above, below, inside, around, touching
    upper_strong = np.array([3.0, 0.9, 1.8, 2.5, 2.4])
    np.testing.assert_array_equal(certify([lower_weak, lower_strong], [upper_weak, upper_strong]),
                                  [True, True, False, False, False])
    third = ([np.full(5, 5.0)], [np.full(5, 6.0)])  # disjoint from both: every pair still decides
    np.testing.assert_array_equal(certify([lower_weak, lower_strong] + third[0], [upper_weak, upper_strong] + third[1]),
                                  [True, True, False, False, False])
    assert certify([lower_weak], [upper_weak]).all()  # one model: nothing to order
    values = {"entropy_weak": (lower_weak + upper_weak) / 2, "entropy_strong": (lower_strong + upper_strong) / 2,
              "entropy_weak_lower": lower_weak, "entropy_weak_upper": upper_weak,
              "entropy_strong_lower": lower_strong, "entropy_strong_upper": upper_strong}
    vllm = VllmBackend(top_k=5)
    np.testing.assert_array_equal(vllm.certified(values, ["weak", "strong"]), [True, True, False, False, False])
    assert TorchBackend().certified(values, ["weak", "strong"]).all()  # exact values are always certified


def test_backends_share_one_interface(models, data_file, tmp_path):
    for backend in (TorchBackend(), VllmBackend(top_k=5)):  # abstract methods left out would refuse to build
        assert isinstance(backend, ScoringBackend)
    jobs = {name: prepare_scoring(models, data_file, tmp_path / f"{name}.parquet", backend=name, top_k=5)
            for name in ("torch", "vllm")}
    assert jobs["torch"].columns == ["id", "n_completion_tokens", "entropy_weak", "entropy_strong", "certified"]
    assert jobs["vllm"].columns == ["id", "n_completion_tokens", "entropy_weak", "entropy_strong",
                                    "entropy_weak_lower", "entropy_weak_upper", "entropy_strong_lower",
                                    "entropy_strong_upper", "certified"]
    assert jobs["torch"].key != jobs["vllm"].key
    # the generic Ray adapter on a torch backend, in process: exactly the backend's columns, and its values
    job = jobs["torch"]
    scorer = Scorer(job.backend, job.models[0], max_model_len=max(map(len, job.tokens)) + 1)
    out = [scorer(table) for table in batch_tables(job, list(range(len(job.ids))))]
    assert all(t.column_names[-1:] == ["entropy_weak"] for t in out)
    got = dict(zip(sum((t["ids"][0].as_py() for t in out), []), sum((t["entropy_weak"][0].as_py() for t in out), [])))
    records, _ = load_records(data_file)
    reference = load_causal_lm(models["weak"]).eval()
    first = tokenize_records(records[:1], load_tokenizer(models["weak"]))[0][0]
    assert got[first["id"]] == pytest.approx(_reference_entropy(reference, first["input_ids"],
                                                                first["labels"].count(-100)), rel=1e-5)


# ---------------------------------------------------------------------------- arguments, before Ray


def test_bad_arguments_fail_with_a_message_before_ray(models, data_file, tmp_path):
    weak, strong, data = str(models["weak"]), str(models["strong"]), str(data_file)
    base = ["score", "--data", data, "--out", str(tmp_path / "s.parquet")]
    cases = {
        "not a model folder": base + ["--weak", str(tmp_path / "missing"), "--strong", strong],
        "--actors must be MIN:MAX": base + ["--weak", weak, "--strong", strong, "--actors", "3:1"],
        "flags: top-k = 0: Input should be greater than or equal to 1": base + ["--weak", weak, "--strong", strong,
                                                                              "--top-k", "0"],
        "--model needs --name": base + ["--model", weak],
        "give --weak and --strong": base + ["--weak", weak],
        "flags: token-budget = 0": base + ["--weak", weak, "--strong", strong, "--token-budget", "0"],
        "flags: gpus-per-actor = -1": base + ["--weak", weak, "--strong", strong, "--gpus-per-actor", "-1"],
        # the config's scoring section, then --set, then flags: one schema checks them all
        "--set: scoring.token_budget = 0": base + ["--set", "scoring.token_budget=0", "--weak", weak, "--strong", strong],
        "config demo: scoring.backend = 'tpu'": ["score", "demo", "--set", "scoring.backend=tpu"] + base[1:] + [
            "--weak", weak, "--strong", strong],
        "missing.jsonl: no such file": ["score", "--data", str(tmp_path / "missing.jsonl"), "--out", "x.parquet",
                                        "--weak", weak, "--strong", strong],
    }
    # a fresh process, so "Ray was never imported" means no Ray resource was requested
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from wmss.cli import main
        results = {{}}
        for expected, argv in {cases!r}.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            results[expected] = [code, err.getvalue()]
        print(json.dumps({{"results": results, "ray_imported": "ray" in sys.modules}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ray_imported"] is False
    for expected, (code, err) in report["results"].items():
        assert code == 2 and expected in err and err.startswith("wmss score: "), (expected, err)


def test_bad_records_follow_on_bad_record_as_in_training(models, data_file, tmp_path):
    """data.on_bad_record reaches scoring: `error` names the file and line, `skip` leaves the record out."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data_file.read_text() + '{"id": "broken", "prompt": 3}\n')
    pair = {"weak": models["weak"], "strong": models["strong"]}
    with pytest.raises(InputError, match=r"bad.jsonl.*line 25"):
        prepare_scoring(pair, bad, tmp_path / "s.parquet")
    job = prepare_scoring(pair, bad, tmp_path / "s.parquet", on_bad_record="skip")
    assert "broken" not in job.ids and len(job.ids) == 24


def test_models_must_share_a_tokenizer(models, data_file, tmp_path):
    other = make_tiny_model(tmp_path / "other-vocab", vocab=400)  # the corpus fills ~640 tokens: 400 differs
    with pytest.raises(InputError, match="different tokenizers or chat templates"):
        prepare_scoring({"weak": models["weak"], "strong": other}, data_file, tmp_path / "s.parquet")
    with pytest.raises(InputError, match="handles 8 positions; pass max_length <= 7"):
        short = make_tiny_model(tmp_path / "short", max_position=8)
        prepare_scoring({"short": short}, data_file, tmp_path / "s.parquet")


def test_a_part_that_does_not_fit_the_job_is_named(models, data_file, tmp_path):
    job = prepare_scoring({"weak": models["weak"]}, data_file, tmp_path / "scores.parquet")
    write_parquet(job.parts_dir / "part-00000.parquet", {"id": ["nope"], "n_completion_tokens": [3],
                                                         "entropy_weak": [1.0], "certified": [True]})
    with pytest.raises(InputError, match=r"part-00000.parquet: id 'nope' is not in the data"):
        run_scoring(job)  # fails while reading the parts, before Ray is touched
    assert not job.out.exists()


# ------------------------------------------------------------------------------------- the Ray job


@pytest.mark.ray
def test_torch_job_scores_weak_and_strong_exactly(ray_local, models, data_file, reference, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    argv = ["score", "--weak", str(models["weak"]), "--strong", str(models["strong"]), "--data", str(data_file),
            "--out", str(out), "--actors", "1:2", "--cpus-per-actor", "0.5", "--token-budget", "700"]
    assert wmss_main(argv) == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "n_completion_tokens", "entropy_weak", "entropy_strong", "certified"]
    assert table.column("certified").to_pylist() == [True] * len(reference["id"])  # exact values: always
    assert table.column("id").to_pylist() == reference["id"]  # every input id once, in input order
    assert table.column("n_completion_tokens").to_pylist() == reference["n_completion_tokens"]
    for name in ("weak", "strong"):
        np.testing.assert_allclose(table.column(f"entropy_{name}").to_numpy(), reference[name], rtol=1e-5)
    assert np.ptp(reference["strong"]) > 0.1  # the peaked models give the samples distinct entropies
    assert not out.with_name(out.name + ".parts").exists()
    printed = capsys.readouterr().out
    assert "score: 24 samples, 0 already scored" in printed and "batches of <= 700 padded tokens" in printed

    mtime = out.stat().st_mtime_ns
    assert wmss_main(argv) == 0
    assert "is up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == mtime


@pytest.mark.ray
def test_a_non_finite_entropy_stops_the_stage_and_seals_nothing(ray_local, models, data_file, tmp_path):
    from wmss.errors import NonFiniteError

    broken = tmp_path / "nan-strong"
    model = load_causal_lm(models["strong"])
    with torch.no_grad():
        output_weight(model)[:, 0] = float("nan")  # every logit NaN: every entropy NaN
    model.save_pretrained(broken)
    load_tokenizer(models["strong"]).save_pretrained(broken)
    out = tmp_path / "scores.parquet"
    with pytest.raises(NonFiniteError, match=r"score: sample .*: entropy_strong is nan .*nan-strong"):
        score_entropy({"weak": models["weak"], "strong": broken}, data_file, out, token_budget=700)
    assert not out.exists()


def test_resume_key_follows_the_models_content_not_their_folder(models, data_file, tmp_path):
    """A copied model folder (another path, new mtimes) keeps the key its parts are filed under, so a copied
    run directory, which the stage engine resumes, resumes its scoring too; one changed byte changes it."""
    import shutil

    copy = shutil.copytree(models["weak"], tmp_path / "copy", copy_function=shutil.copy)  # copy: new mtimes

    def key(model: Path) -> str:
        return prepare_scoring({"weak": model}, data_file, tmp_path / "scores.parquet").key

    assert key(copy) == key(models["weak"])
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert key(copy) != key(models["weak"])


@pytest.mark.ray
def test_rerun_reuses_finished_parts_and_ignores_debris(ray_local, models, data_file, reference, tmp_path, capsys):
    job = prepare_scoring({"weak": models["weak"]}, data_file, tmp_path / "scores.parquet", cpus_per_actor=0.5)
    planted = {"id": job.ids[:5], "n_completion_tokens": job.n_completion_tokens[:5],
               "entropy_weak": [100.0 + i for i in range(5)],  # impossible entropies: they can only come from the part
               "certified": [True] * 5}
    write_parquet(job.parts_dir / "part-00000.parquet", planted)
    debris = job.parts_dir / ".part-00001.parquet.x1y2.tmp"  # what a kill during atomic_path leaves behind
    debris.mkdir()
    (debris / "part-00001.parquet").write_bytes(b"PAR1 half written")
    stale = job.parts_root / "0123456789abcdef"  # parts of a run with other inputs
    stale.mkdir()

    run_scoring(job)
    assert "24 samples, 5 already scored" in capsys.readouterr().out
    table = pq.read_table(job.out)
    assert table.column("id").to_pylist() == reference["id"]
    scores = table.column("entropy_weak").to_numpy()
    np.testing.assert_array_equal(scores[:5], planted["entropy_weak"])
    np.testing.assert_allclose(scores[5:], reference["weak"][5:], rtol=1e-5)
    assert not job.parts_root.exists()


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_top_k_bounds_contain_the_exact_entropy(ray_local, models, data_file, reference, tmp_path):
    from scipy.stats import spearmanr

    out = score_entropy(models, data_file, tmp_path / "scores.parquet", backend="vllm", top_k=5,
                        cpus_per_actor=0.5)
    table = pq.read_table(out)
    assert table.column_names == ["id", "n_completion_tokens", "entropy_weak", "entropy_strong",
                                  "entropy_weak_lower", "entropy_weak_upper", "entropy_strong_lower",
                                  "entropy_strong_upper", "certified"]
    assert table.column("id").to_pylist() == reference["id"]
    bounds = {c: table.column(c).to_numpy() for c in table.column_names if c.endswith(("_lower", "_upper"))}
    certified = table.column("certified").to_numpy()
    np.testing.assert_array_equal(certified, certify([bounds["entropy_weak_lower"], bounds["entropy_strong_lower"]],
                                                     [bounds["entropy_weak_upper"], bounds["entropy_strong_upper"]]))
    # where the bounds certify the sign of dH, the exact entropies have that sign
    says_rose = bounds["entropy_strong_lower"] > bounds["entropy_weak_upper"]
    exact_rose = reference["strong"] > reference["weak"]
    np.testing.assert_array_equal(says_rose[certified], exact_rose[certified])
    print(f"vLLM top-5: {np.mean(~certified):.0%} of samples with the sign of dH uncertified")
    for name in ("weak", "strong"):
        exact = reference[name]
        estimate, lower, upper = (table.column(f"entropy_{name}{s}").to_numpy() for s in ("", "_lower", "_upper"))
        assert np.all(lower <= exact + TOLERANCE) and np.all(exact <= upper + TOLERANCE), name
        assert np.all((lower <= estimate) & (estimate <= upper))
        assert np.all(upper - lower > 1e-3)  # with K=5 of 2048 the bounds are a real interval
        rho = spearmanr(estimate, exact).statistic
        print(f"vLLM top-5 estimate vs exact entropy, {name} model: Spearman {rho:.3f}, "
              f"mean bound width {np.mean(upper - lower):.3f} nats")


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_with_the_whole_vocabulary_equals_torch(ray_local, models, data_file, reference, tmp_path):
    out = tmp_path / "weak.parquet"
    assert wmss_main(["score", "--model", str(models["weak"]), "--name", "weak", "--data", str(data_file),
                      "--out", str(out), "--backend", "vllm", "--top-k", "2048", "--cpus-per-actor", "0.5"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "n_completion_tokens", "entropy_weak", "entropy_weak_lower",
                                  "entropy_weak_upper", "certified"]
    assert all(table.column("certified").to_pylist())  # one model: no pair to order
    for column in ("entropy_weak", "entropy_weak_lower", "entropy_weak_upper"):
        np.testing.assert_allclose(table.column(column).to_numpy(), reference["weak"], atol=TOLERANCE)
