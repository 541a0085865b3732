"""wmss.synthetic: the generated arithmetic demo task."""

from __future__ import annotations

import re

import pytest

from wmss.synthetic import SYSTEM_PROMPT, corpus_lines, make_problems, make_splits, pretraining_texts, training_rows

# question phrasing -> operation, written independently of the generator's tables
_QUESTION_OPS = [(r"(?:buys|finds|gives \w+) (\d+) more", "+"), (r"(?:gives away|loses|sells) (\d+)", "-")]
_STEP = re.compile(r"^(\d+) ([-+]) (\d+) = (\d+)\.$")


def _answer_from_question(question: str) -> int:
    """Solve a generated question from its text alone."""
    sentences = re.split(r"(?<=[.?]) ", question)
    value = int(re.fullmatch(r"\w+ has (\d+) [\w ]+\.", sentences[0]).group(1))
    for sentence in sentences[1:-1]:
        [(operand, op)] = [(next(g for g in m.groups() if g), op) for pattern, op in _QUESTION_OPS
                           if (m := re.search(pattern, sentence))]
        k = int(operand)
        assert 1 <= k <= 5, question
        value = value + k if op == "+" else value - k
        assert 1 <= value <= 12, question
    assert sentences[-1].startswith("How many"), question
    return value


def test_problems_are_deterministic_by_seed_and_prefix_stable():
    first = make_problems(60, seed=7)
    assert make_problems(60, seed=7) == first
    assert make_problems(20, seed=7) == first[:20]
    assert [p["id"] for p in first] == [f"arith-7-{i}" for i in range(60)]
    other = make_problems(60, seed=8)
    assert sum(a["question"] == b["question"] for a, b in zip(first, other)) < 3


def test_every_solution_ends_with_the_boxed_answer_and_the_answer_is_right():
    problems = make_problems(300, seed=0)
    for p in problems:
        answer = _answer_from_question(p["question"])
        assert p["answer"] == str(answer)
        assert p["solution"].endswith(f"\\boxed{{{answer}}}")
        lines = p["solution"].split("\n")
        steps = [m for line in lines if (m := _STEP.match(line))]
        assert 2 <= len(steps) <= 3 and len(lines) == len(steps) + 1
        value = int(re.match(r"\w+ has (\d+) ", p["question"]).group(1))
        assert 2 <= value <= 9
        for a, op, k, result in (m.groups() for m in steps):  # every worked step is correct and chained
            assert int(a) == value
            value = value + int(k) if op == "+" else value - int(k)
            assert int(result) == value
        assert value == answer
    assert {op for p in problems for op in re.findall(r" ([-+]) \d+ =", p["solution"])} == set("+-")


def test_step_counts_follow_the_arguments():
    for p in make_problems(50, seed=1, min_steps=1, max_steps=1):
        assert p["solution"].count(" = ") == 1
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        make_problems(1, seed=0, min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_problems(-1, seed=0)


def test_splits_are_disjoint_deterministic_and_the_held_out_split_is_stable():
    train, held_out = make_splits(500, 100, seed=3)
    assert (len(train), len(held_out)) == (500, 100)
    assert not {p["question"] for p in train} & {p["question"] for p in held_out}
    assert len({p["question"] for p in train + held_out}) == 600
    assert len({p["id"] for p in train + held_out}) == 600
    assert make_splits(500, 100, seed=3) == (train, held_out)
    assert make_splits(50, 100, seed=3)[1] == held_out
    assert make_splits(500, 100, seed=4)[1] != held_out
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        make_splits(-1, 1, seed=0)


def test_training_rows_are_chat_records_with_the_eval_system_prompt():
    problems = make_problems(3, seed=0)
    rows = training_rows(problems)
    assert "\\boxed{}" in SYSTEM_PROMPT and "step by step" in SYSTEM_PROMPT
    for row, p in zip(rows, problems):
        assert row == {"id": p["id"], "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                                   {"role": "user", "content": p["question"]},
                                                   {"role": "assistant", "content": p["solution"]}]}


def test_corpus_is_deterministic_single_line_and_does_not_replay_the_splits():
    lines = corpus_lines(2000, seed=0)
    assert lines == corpus_lines(2000, seed=0) and lines != corpus_lines(2000, seed=1)
    assert len(lines) == 2000 and all(line and "\n" not in line for line in lines)
    assert lines[0] == SYSTEM_PROMPT
    assert sum("\\boxed{" in line for line in lines[1:]) == 1000  # half problems, half one-line sums
    train, held_out = make_splits(200, 200, seed=0)
    text = "\n".join(lines)
    assert not [p for p in train + held_out if p["question"] in text]


def test_pretraining_texts_mix_chat_transcripts_and_facts_in_the_task_range():
    texts = pretraining_texts(1000, seed=1, chat=lambda messages: "|".join(m["content"] for m in messages))
    assert texts == pretraining_texts(1000, seed=1, chat=lambda messages: "|".join(m["content"] for m in messages))
    chats, facts = texts[:300], texts[300:]
    assert len(texts) == 1000 and all(t.startswith(SYSTEM_PROMPT + "|") for t in chats)
    for fact in facts:
        a, op, k, result = re.fullmatch(r"(\d+) ([-+]) (\d+) = (\d+)\.", fact).groups()
        assert int(result) == (int(a) + int(k) if op == "+" else int(a) - int(k))
        assert all(1 <= int(v) <= 12 for v in (a, k, result))
    train, held_out = make_splits(200, 200, seed=0)
    assert not [p for p in train + held_out if p["question"] in "\n".join(chats)]  # a stream of its own
    with pytest.raises(ValueError, match="chat_share"):
        pretraining_texts(10, seed=0, chat=str, chat_share=1.5)
