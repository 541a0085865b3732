"""wmss.models: the tiny offline model, loading, final hidden states, the weak/strong pair, extract."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from wmss.cli import main as wmss_main
from wmss.data import IGNORE_INDEX, records_from_rows, tokenize_records
from wmss.models import (
    WeakStrongPair,
    extract_strong,
    final_hidden,
    load_causal_lm,
    load_tokenizer,
    make_tiny_model,
    output_weight,
)
from wmss.synthetic import make_problems, training_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def strong_dir(tmp_path_factory) -> Path:
    # wider than tiny_dir (3 heads of 64): a pair may mix models of different hidden sizes
    return make_tiny_model(tmp_path_factory.mktemp("strong") / "model", seed=1, hidden=192, heads=3)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _random_batch(vocab: int, seed: int, batch: int = 3, length: int = 11):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0  # a right-padded row
    return input_ids, attention_mask


def test_tiny_model_loads_with_auto_classes(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (2048, 128, 2, 64)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    assert tokenizer.eos_token == "<|im_end|>" and cfg.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>" and cfg.pad_token_id == tokenizer.pad_token_id
    assert 259 < len(tokenizer) <= cfg.vocab_size
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    text = "Mia has 12 apples. Then Mia gives away 5 apples.\n12 - 5 = 7."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("123")["input_ids"]) == ["1", "2", "3"]


def test_chat_template_renders_chatml(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "\\boxed{5}"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{5}<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    assert sum(i in specials for i in ids) == 5  # each special token is one id, never split into bytes


def test_synthetic_training_rows_format_with_the_tiny_tokenizer(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    problems = make_problems(20, seed=0)
    records, report = records_from_rows(training_rows(problems), "synthetic")
    assert report.n_records == 20 and report.n_rejected == 0
    samples, n_truncated = tokenize_records(records, tokenizer, max_length=tokenizer.model_max_length)
    assert n_truncated == 0
    for sample, problem in zip(samples, problems):
        completion = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
        assert tokenizer.decode(completion) == problem["solution"] + "<|im_end|>\n"
        assert tokenizer.decode(sample["input_ids"][:-len(completion)]).startswith("<|im_start|>system\n")


def test_same_seed_gives_identical_files_in_a_fresh_process_via_cli(tiny_dir, tmp_path):
    # a fresh process also catches hash-order randomness (Python's and the tokenizers library's)
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "wmss.cli", "tiny-model", "--out", str(out), "--seed", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert _file_hashes(out) == _file_hashes(tiny_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_different_seed_gives_different_weights_and_the_same_tokenizer(tiny_dir, tmp_path):
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    ours, theirs = _file_hashes(tiny_dir), _file_hashes(other)
    assert ours["model.safetensors"] != theirs["model.safetensors"]
    assert ours["tokenizer.json"] == theirs["tokenizer.json"]


def test_make_tiny_model_does_not_touch_the_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "m", layers=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": 128, "heads": 4}, "hidden // heads must be >= 64"),
    ({"heads": 2, "kv_heads": 3}, "multiple of kv_heads"),
    ({"vocab": 259}, "vocab must be > 259"),
    ({"layers": 0}, "must be >= 1"),
])
def test_make_tiny_model_rejects_bad_shapes(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_cli_reports_bad_shape_with_exit_code_2(tmp_path, capsys):
    assert wmss_main(["tiny-model", "--out", str(tmp_path / "m"), "--hidden", "32"]) == 2
    assert "hidden // heads must be >= 64" in capsys.readouterr().err


def test_final_hidden_times_output_weight_equals_model_logits(tiny_dir):
    model = load_causal_lm(tiny_dir)
    input_ids, attention_mask = _random_batch(model.config.vocab_size, seed=0)
    lm_head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *_: lm_head_calls.append(1))
    with torch.no_grad():
        hidden = final_hidden(model, input_ids, attention_mask)
        assert lm_head_calls == []  # the hidden states come without ever computing logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    hook.remove()
    assert hidden.shape == (*input_ids.shape, model.config.hidden_size)
    torch.testing.assert_close(hidden @ output_weight(model).T, logits, rtol=1e-5, atol=1e-5)


def test_final_hidden_uses_given_input_embeddings(tiny_dir):
    model = load_causal_lm(tiny_dir)
    input_ids, attention_mask = _random_batch(model.config.vocab_size, seed=1)
    embeds = model.get_input_embeddings()(input_ids)
    with torch.no_grad():
        plain = final_hidden(model, input_ids, attention_mask)
        same = final_hidden(model, input_ids, attention_mask, inputs_embeds=embeds)
        noise = 0.1 * torch.randn_like(embeds)
        noisy = final_hidden(model, input_ids, attention_mask, inputs_embeds=embeds + noise)
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(noisy, plain, atol=1e-3)
    with pytest.raises(ValueError, match="inputs_embeds has shape"):
        final_hidden(model, input_ids, inputs_embeds=embeds[:, :-1])


def _mixed_ce(pair: WeakStrongPair, input_ids, attention_mask, mix_lambda: float = 0.5) -> torch.Tensor:
    # the plain reference of method.md's mixed loss, enough to drive gradients into both models
    h_weak, h_strong = pair(input_ids, attention_mask)
    w_weak, w_strong = pair.output_weights()
    logits = (1 - mix_lambda) * h_weak @ w_weak.T + mix_lambda * h_strong @ w_strong.T
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def test_pair_with_different_hidden_sizes_returns_both_hidden_states(tiny_dir, strong_dir):
    weak, strong = load_causal_lm(tiny_dir), load_causal_lm(strong_dir)
    pair = WeakStrongPair(weak, strong)
    input_ids, attention_mask = _random_batch(weak.config.vocab_size, seed=2)
    with torch.no_grad():
        h_weak, h_strong = pair(input_ids, attention_mask)
        torch.testing.assert_close(h_weak, final_hidden(weak, input_ids, attention_mask))
        torch.testing.assert_close(h_strong, final_hidden(strong, input_ids, attention_mask))
    assert h_weak.shape == (3, 11, 128) and h_strong.shape == (3, 11, 192)
    w_weak, w_strong = pair.output_weights()
    assert w_weak.shape == (2048, 128) and w_strong.shape == (2048, 192)
    assert w_weak is output_weight(weak) and w_strong is output_weight(strong)


@pytest.mark.parametrize("freeze_weak", [True, False])
def test_freeze_weak_keeps_weak_parameters_fixed_through_an_optimizer_step(tiny_dir, strong_dir, freeze_weak):
    pair = WeakStrongPair(load_causal_lm(tiny_dir), load_causal_lm(strong_dir), freeze_weak=freeze_weak)
    pair.train()
    assert all(p.requires_grad != freeze_weak for p in pair.weak.parameters())
    assert all(p.requires_grad for p in pair.strong.parameters())
    before = {name: p.detach().clone() for name, p in pair.named_parameters()}
    optimizer = torch.optim.AdamW(pair.parameters(), lr=1e-2)  # every parameter, as a careless loop would
    loss = _mixed_ce(pair, *_random_batch(2048, seed=3))
    loss.backward()
    optimizer.step()
    assert all((p.grad is None) == freeze_weak for p in pair.weak.parameters())
    changed = {name for name, p in pair.named_parameters() if not torch.equal(p, before[name])}
    weak_changed = {n for n in changed if n.startswith("weak.")}
    assert (not weak_changed) if freeze_weak else weak_changed
    assert {n for n in changed if n.startswith("strong.")}


def test_extract_strong_round_trip_gives_equal_logits(tiny_dir, strong_dir, tmp_path):
    pair = WeakStrongPair(load_causal_lm(tiny_dir), load_causal_lm(strong_dir))
    optimizer = torch.optim.AdamW(pair.parameters(), lr=1e-2)
    _mixed_ce(pair, *_random_batch(2048, seed=4)).backward()
    optimizer.step()  # so the extracted weights differ from the files the pair was loaded from
    out = extract_strong(pair, load_tokenizer(strong_dir), tmp_path / "strong")
    assert out == tmp_path / "strong"
    reloaded = load_causal_lm(out)
    assert reloaded.config.hidden_size == 192
    input_ids, attention_mask = _random_batch(2048, seed=5)
    pair.eval()
    with torch.no_grad():
        expected = pair.strong(input_ids=input_ids, attention_mask=attention_mask).logits
        got = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits
        original = load_causal_lm(strong_dir)(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, original)
    assert _file_hashes(out)["tokenizer.json"] == _file_hashes(strong_dir)["tokenizer.json"]


def test_pair_rejects_models_with_different_vocabularies(tiny_dir, tmp_path):
    small_vocab = load_causal_lm(make_tiny_model(tmp_path / "v1024", vocab=1024))
    with pytest.raises(ValueError, match="share one vocabulary.*2048 rows.*1024"):
        WeakStrongPair(load_causal_lm(tiny_dir), small_vocab)


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys

    from vllm import LLM, SamplingParams, TokensPrompt

    if __name__ == "__main__":
        model_dir, prompt_ids, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
        # An explicit KV-cache size: the CPU backend otherwise reserves a fraction of the machine's memory.
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, enable_prefix_caching=False,
                  max_model_len=256, kv_cache_memory_bytes=64 * 2**20, seed=0)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
        [result] = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params)
        prompt_logprobs = [None if d is None else d[t].logprob
                           for t, d in zip(prompt_ids, result.prompt_logprobs)]
        with open(out_path, "w") as f:
            json.dump({"greedy": list(result.outputs[0].token_ids), "prompt_logprobs": prompt_logprobs,
                       "text": result.outputs[0].text}, f)
""")


@pytest.mark.vllm
def test_vllm_cpu_loads_the_tiny_model_and_matches_transformers(tiny_dir, tmp_path):
    tokenizer, model = load_tokenizer(tiny_dir), load_causal_lm(tiny_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Mia has 3 apples."}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    script, out = tmp_path / "run_vllm.py", tmp_path / "vllm.json"
    script.write_text(VLLM_SCRIPT)
    # one process: a separate engine-core process would import vLLM a second time (~20 s on 2 cores)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, str(script), str(tiny_dir), json.dumps(prompt_ids), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        greedy = []
        for _ in range(6):  # greedy continuation, ignoring end-of-sequence like the vLLM run
            greedy.append(int(model(input_ids=ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], dim=1)
    expected = [logprobs[i - 1, t].item() for i, t in enumerate(prompt_ids) if i > 0]
    assert result["prompt_logprobs"][0] is None
    assert result["prompt_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert result["greedy"] == greedy
