"""Benchmarks, generation and `wmss eval`: pass@k against its definition, batched HF generation against a
plain greedy loop, the batched gold-solution NLL against a one-problem-at-a-time cross-entropy, benchmark
layouts and their errors, and `wmss eval` of the tiny model on 20 problems of two benchmarks with both
backends (the vLLM run must reproduce the HF responses) and on extra rows with gold solutions (their NLL)."""

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SHARED_EVAL

from wmss.data import IGNORE_INDEX, BadRecordError, format_example
from wmss.evaluation.benchmarks import (BENCHMARKS, SYSTEM_PROMPTS, load_benchmark, problem_record,
                                        problems_from_rows)
from wmss.evaluation.generation import finish_response, generate_hf
from wmss.evaluation.grading import grade
from wmss.evaluation.harness import gold_nll, pass_at_k, summarize

N_PROBLEMS, MAX_NEW = 20, 16


# ------------------------------------------------------------------------------------------------ metrics


def test_pass_at_k_matches_its_definition():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 40)
        c, k = rng.randint(0, n), rng.randint(1, n)
        reference = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(reference, abs=1e-12)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 101, 100) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_summarize():
    predictions = [  # problem a: 1 of 2 right, problem b: 0 of 2 right
        {"id": "a", "correct": True, "truncated": False, "response_tokens": 10},
        {"id": "a", "correct": False, "truncated": True, "response_tokens": 30},
        {"id": "b", "correct": False, "truncated": False, "response_tokens": 20},
        {"id": "b", "correct": False, "truncated": True, "response_tokens": 40},
    ]
    summary = summarize(predictions, samples=2)
    assert summary == {"n_problems": 2, "samples_per_problem": 2, "accuracy": 0.25, "truncation_rate": 0.5,
                       "mean_response_tokens": 25.0, "pass_at_1": 0.25, "pass_at_2": 0.5}


def test_finish_response():
    assert finish_response([5, 6, 2, 7], [2], 10) == ([5, 6], False)  # ends at the stop token
    assert finish_response([5, 6, 7, 8], [2], 4) == ([5, 6, 7, 8], True)  # ran out of budget
    assert finish_response([5, 6, 7, 8, 9], [2], 3) == ([5, 6, 7], True)  # cut to the request's own budget
    assert finish_response([5, 6], [2], 4) == ([5, 6], False)  # the engine stopped early on its own
    assert finish_response([2], [2, 3], 4) == ([], False)


def test_metrics_go_to_the_active_mlflow_run(tmp_path, monkeypatch):
    import mlflow

    from wmss.evaluation.harness import _log_to_mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'active.db'}")
    with mlflow.start_run() as run:
        _log_to_mlflow({"gsm8k": {"accuracy": 0.5, "pass_at_1": 0.5}}, {"model": "m"}, tmp_path / "out")
    assert mlflow.get_run(run.info.run_id).data.metrics == {"eval/gsm8k/accuracy": 0.5, "eval/gsm8k/pass_at_1": 0.5}
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- generation


# Qwen3's switch, in the tiny model's ChatML: thinking off pre-fills an empty think block.
THINK_OFF = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir, tmp_path_factory):
    """(folder, model, tokenizer) of a copy of the tiny model whose chat template has Qwen3's thinking switch."""
    import shutil

    from wmss.models import CHATML_TEMPLATE, load_causal_lm, load_tokenizer

    path = tmp_path_factory.mktemp("thinking") / "tiny"
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").write_text(
        CHATML_TEMPLATE + "{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
                          "{{- '" + THINK_OFF.replace("\n", "\\n") + "' }}{%- endif %}")
    return path, load_causal_lm(path).eval(), load_tokenizer(path)


def _greedy_reference(model, prompt: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """Plain greedy decoding: one full forward per token, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in stop_ids:
                break
    return ids[len(prompt):]


def test_batched_hf_generation_matches_plain_greedy_decoding(tiny_model):
    _path, model, tokenizer = tiny_model
    rng = random.Random(1)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    # A stop id the random model emits now and then, so some sequences end early and get padded.
    stop_ids = [tokenizer.eos_token_id, _greedy_reference(model, prompts[0], 3, [])[2]]
    batched = generate_hf(model, prompts, max_new_tokens=12, temperature=0.0, pad_id=tokenizer.pad_token_id,
                          stop_ids=stop_ids, seed=0)
    reference = [_greedy_reference(model, p, 12, stop_ids) for p in prompts]
    assert batched == reference
    assert any(len(r) < 12 for r in reference)  # the padding path was exercised


def test_sampled_generation_is_seeded(tiny_model):
    _path, model, tokenizer = tiny_model
    prompts = [[5, 6, 7], [8, 9]]
    kwargs = dict(max_new_tokens=10, temperature=1.0, pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id])
    first, again, other = (generate_hf(model, prompts, seed=s, **kwargs) for s in (1, 1, 2))
    assert first == again
    assert first != other


# ---------------------------------------------------------------------------------------------- gold NLL


def _nll_reference(model, tokenizer, records) -> tuple[float, int]:
    """(total NLL, supervised tokens) one record at a time: full logits, no padding, plain cross-entropy."""
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for record in records:
            example = format_example(record, tokenizer)
            logits = model(torch.tensor([example.input_ids])).logits[0].float()
            labels = torch.tensor(example.labels)
            assert labels[-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the end of turn is supervised
            total += float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX,
                                                             reduction="sum"))
            n_tokens += int((labels != IGNORE_INDEX).sum())
    return total, n_tokens


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_gold_nll_matches_one_problem_at_a_time(tiny_model, batch_size):
    _path, model, tokenizer = tiny_model
    rng = random.Random(batch_size)
    words = "apples pears Tom Mia has buys gives away so the final answer is".split()
    problems = [problems_from_rows([(f"row {i}", {"question": " ".join(rng.choices(words, k=rng.randint(2, 30))),
                                                  "answer": "1"})], "test", "synthetic")[0] for i in range(7)]
    records = [replace(problem_record("synthetic", p), completion=" ".join(rng.choices(words, k=rng.randint(1, 40))))
               for p in problems]
    result = gold_nll(model, tokenizer, records, batch_size=batch_size)
    total, n_tokens = _nll_reference(model, tokenizer, records)
    assert result["nll_tokens"] == n_tokens
    assert result["nll"] == pytest.approx(total / n_tokens, rel=1e-5)


# ---------------------------------------------------------------------------------------------- benchmarks


def test_local_layouts_and_prompts(tmp_path, tiny_model):
    _path, _model, tokenizer = tiny_model
    rows = [{"question": "What is 2 + 2?", "answer": "4"},
            {"instruction": "Add the numbers.", "input": "3 and 5", "output": "ignored", "answer": "8.0"},
            {"instruction": "Say seven.", "input": "", "answer": 7, "id": "seven"}]
    (tmp_path / "svamp.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems = load_benchmark("svamp", tmp_path)
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("0", "What is 2 + 2?", "4"), ("1", "Add the numbers.\n\n3 and 5", "8.0"), ("seven", "Say seven.", "7")]
    assert load_benchmark("svamp", tmp_path, limit=2) == problems[:2]
    prompt = tokenizer.decode(format_example(problem_record("svamp", problems[0]), tokenizer).input_ids)
    assert SYSTEM_PROMPTS["math"] in prompt and prompt.endswith("<|im_start|>assistant\n")  # thinking on
    aqua_prompt = tokenizer.decode(format_example(problem_record("aqua", problems[0]), tokenizer).input_ids)
    assert SYSTEM_PROMPTS["choice"] in aqua_prompt


def test_bad_rows_are_named_by_file_line_and_field(tmp_path):
    (tmp_path / "gsm8k.json").write_text('[\n  {"question": "q1", "answer": "1"},\n  {"question": "q2"}\n]\n')
    with pytest.raises(BadRecordError, match=r"gsm8k\.json, line 3, field 'answer'"):
        load_benchmark("gsm8k", tmp_path)
    (tmp_path / "gsm8k.json").write_text('[{"question": "q", "answer": "1", "id": 4}, {"question": "r", "answer": "2", "id": "4"}]')
    with pytest.raises(BadRecordError, match="repeats the id"):
        load_benchmark("gsm8k", tmp_path)
    (tmp_path / "gsm8k.jsonl").write_text("")
    with pytest.raises(ValueError, match="more than one local file"):
        load_benchmark("gsm8k", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("gsm9k", tmp_path)


def test_hub_layouts():
    def one(name, row):
        return problems_from_rows([("row 0", row)], "hub", name)[0]

    gsm8k = one("gsm8k", {"question": "q", "answer": "6 * 2 = 12\n#### 1,200"})
    assert gsm8k.answer == "1200"
    svamp = one("svamp", {"Body": "Tom has 3 apples.", "Question": "How many?", "Answer": 3.0})
    assert (svamp.question, svamp.answer) == ("Tom has 3 apples. How many?", "3.0")
    aqua = one("aqua", {"question": "Pick.", "options": ["A)21", "B)22"], "correct": "B"})
    assert aqua.question == "Pick. Answer Choices: (A) 21 (B) 22" and aqua.answer == "B"
    assert one("math500", {"problem": "x?", "answer": "\\frac{1}{2}", "unique_id": "u1"}).id == "u1"
    assert one("mawps", {"question": "q", "result": "5"}).answer == "5"
    mbpp = one("mbpp", {"task_id": 11, "text": "Write add.", "test_list": ["assert add(1, 2) == 3"],
                        "test_setup_code": ""})
    assert mbpp.id == "11" and "assert add(1, 2) == 3" in mbpp.question
    assert grade("```python\ndef add(a, b):\n    return a + b\n```", mbpp.answer, "mbpp").correct
    with pytest.raises(BadRecordError, match="field 'test_list'"):
        one("mbpp", {"text": "Write add.", "test_list": []})


def test_benchmark_registry():
    assert set(BENCHMARKS) == {"gsm8k", "svamp", "mawps", "aqua", "aime2025", "amc23", "math500", "humaneval", "mbpp"}
    assert {n for n, b in BENCHMARKS.items() if b.max_new_tokens == 8192} == {"aime2025", "amc23"}
    humaneval = load_benchmark("humaneval")
    assert len(humaneval) == 164 and humaneval[0].id == "HumanEval/0"
    assert "check(has_close_elements)" in humaneval[0].answer


# ------------------------------------------------------------------------------------------------ wmss eval


@pytest.fixture(scope="module")
def eval_data_dir(tmp_path_factory):
    """The shared evaluation files when present, else 20 made-up problems per benchmark in their layout."""
    if (SHARED_EVAL / "gsm8k.json").is_file() and (SHARED_EVAL / "aqua.json").is_file():
        return SHARED_EVAL
    folder = tmp_path_factory.mktemp("eval-data")
    rng = random.Random(0)
    gsm8k = [{"instruction": f"Tom has {a} apples and buys {b}. How many now?", "input": "", "answer": f"{a + b}.0"}
             for a, b in ((rng.randint(1, 50), rng.randint(1, 50)) for _ in range(N_PROBLEMS))]
    aqua = [{"instruction": f"What is {a} + 1? Answer Choices: (A) {a} (B) {a + 1} (C) {a + 2}", "input": "",
             "answer": "B"} for a in range(N_PROBLEMS)]
    (folder / "gsm8k.json").write_text(json.dumps(gsm8k))
    (folder / "aqua.json").write_text(json.dumps(aqua))
    return folder


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_eval(tiny_model, eval_data_dir, ray_local, tmp_path_factory):
    from wmss.cli import main

    path, _model, _tokenizer = tiny_model
    out = tmp_path_factory.mktemp("eval-hf")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        code = main(["eval", "--model", str(path), "--benchmarks", "gsm8k,aqua", "--data-dir", str(eval_data_dir),
                     "--limit", str(N_PROBLEMS), "--backend", "hf", "--max-new-tokens", str(MAX_NEW),
                     "--thinking", "off", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.ray
def test_wmss_eval_hf(hf_eval, tiny_model, eval_data_dir):
    from mlflow.tracking import MlflowClient

    from wmss.evaluation.generation import stop_token_ids

    path, model, tokenizer = tiny_model
    summary = json.loads((hf_eval / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"gsm8k", "aqua"}
    problems = {name: load_benchmark(name, eval_data_dir, N_PROBLEMS) for name in ("gsm8k", "aqua")}
    stop_ids = stop_token_ids(path, tokenizer)
    for name, bench_problems in problems.items():
        predictions = _read_jsonl(hf_eval / "predictions" / f"{name}.jsonl")
        assert [p["id"] for p in predictions] == [p.id for p in bench_problems]
        for prediction, problem in zip(predictions, bench_problems):
            assert set(prediction) == {"id", "sample", "prompt", "response", "extracted", "gold", "correct",
                                       "truncated", "response_tokens"}
            assert prediction["gold"] == problem.answer
            assert prediction["correct"] == grade(prediction["response"], problem.answer, name).correct
            assert prediction["truncated"] == (prediction["response_tokens"] == MAX_NEW)
        for prediction, problem in list(zip(predictions, bench_problems))[:3]:
            prompt = format_example(problem_record(name, problem), tokenizer, enable_thinking=False).input_ids
            reference = finish_response(_greedy_reference(model, prompt, MAX_NEW, stop_ids), stop_ids, MAX_NEW)[0]
            assert prediction["response"] == tokenizer.decode(reference, skip_special_tokens=True)
            assert prediction["prompt"] == tokenizer.decode(prompt)
            assert prediction["prompt"].endswith("<|im_start|>assistant\n" + THINK_OFF)
        assert summary["benchmarks"][name] == pytest.approx(summarize(predictions, 1))
    client = MlflowClient(tracking_uri=f"sqlite:///{hf_eval / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("wmss eval").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["eval/gsm8k/accuracy"] == summary["benchmarks"]["gsm8k"]["accuracy"]
    assert runs[0].data.metrics["eval/aqua/truncation_rate"] == summary["benchmarks"]["aqua"]["truncation_rate"]
    assert runs[0].data.params["backend"] == "hf"


@pytest.mark.ray
@pytest.mark.vllm
def test_wmss_eval_vllm_reproduces_hf_in_a_workflow_stage_run(hf_eval, tiny_model, eval_data_dir, tmp_path):
    from wmss.evaluation import evaluate
    from wmss.tracking import Tracker

    path, _model, _tokenizer = tiny_model
    tracker = Tracker(f"sqlite:///{tmp_path / 'workflow.db'}", "workflow", "run")
    with tracker.stage("eval", tags={"wmss.method": "sft"}) as stage:
        summaries = evaluate(path, ["gsm8k", "aqua"], tmp_path / "out", data_dir=eval_data_dir, limit=N_PROBLEMS,
                             backend="vllm", max_new_tokens=MAX_NEW, enable_thinking=False, mlflow_run=stage)
    metrics = tracker.client.get_run(stage.run_id).data.metrics
    assert metrics["eval/gsm8k/accuracy"] == summaries["gsm8k"]["accuracy"]
    assert metrics["eval/aqua/mean_response_tokens"] == summaries["aqua"]["mean_response_tokens"]
    assert not (tmp_path / "out" / "mlflow.db").exists()  # logged to the workflow's run, not a new store
    for name in ("gsm8k", "aqua"):
        vllm_predictions = _read_jsonl(tmp_path / "out" / "predictions" / f"{name}.jsonl")
        hf_predictions = _read_jsonl(hf_eval / "predictions" / f"{name}.jsonl")
        assert len(vllm_predictions) == N_PROBLEMS
        same = sum(v["response"] == h["response"] for v, h in zip(vllm_predictions, hf_predictions))
        # Both decode greedily in float32; a near-tie in the random model's logits may flip a token.
        assert same >= 0.9 * N_PROBLEMS, f"{name}: only {same} of {N_PROBLEMS} responses agree"


@pytest.mark.ray
def test_evaluate_reports_the_gold_solutions_nll(tiny_model, ray_local, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from wmss.evaluation import evaluate

    path, model, tokenizer = tiny_model
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = [{"id": f"p{i}", "question": f"Tom has {i} apples and buys 2. How many now?",
             "solution": f"Tom starts with {i} apples.\nHe buys 2: {i} + 2 = {i + 2}.\n"
                         f"The final answer is \\boxed{{{i + 2}}}", "answer": str(i + 2)} for i in range(5)]
    unsolved = [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in rows]
    summaries = evaluate(path, [], tmp_path, max_new_tokens=4,
                         extra_benchmarks={"synthetic": rows, "unsolved": unsolved})
    records = [replace(problem_record("synthetic", p), completion=r["solution"])
               for p, r in zip(problems_from_rows(enumerate(rows), "rows", "synthetic"), rows)]
    total, n_tokens = _nll_reference(model, tokenizer, records)
    assert summaries["synthetic"]["nll_tokens"] == n_tokens
    assert summaries["synthetic"]["nll"] == pytest.approx(total / n_tokens, rel=1e-5)
    assert "nll" not in summaries["unsolved"] and "nll_tokens" not in summaries["unsolved"]
    written = json.loads((tmp_path / "summary.json").read_text())["benchmarks"]
    assert written["synthetic"]["nll"] == summaries["synthetic"]["nll"]
    assert written["synthetic"]["nll_tokens"] == n_tokens
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run, = client.search_runs([client.get_experiment_by_name("wmss eval").experiment_id])
    assert run.data.metrics["eval/synthetic/nll"] == summaries["synthetic"]["nll"]
