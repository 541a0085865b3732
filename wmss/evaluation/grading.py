"""Answer extraction and graders (the paper's protocol): math by the LAST `\\boxed{...}` compared with the
gold by mathematical equivalence (math-verify), multiple choice by the option letter, code by running the
benchmark's tests against the extracted program in the sandbox."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from wmss.evaluation.benchmarks import benchmark_kind
from wmss.evaluation.sandbox import run_python

@dataclass(frozen=True)
class Grade:
    extracted: str | None  # the answer the grader read from the response (None: there was none)
    correct: bool


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces
    included; None when there is none. An unclosed box (a response cut off mid-answer) is no answer."""
    last = None
    for match in re.finditer(r"\\(?:boxed|fbox)\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    last = text[start:i]
                    break
    return last


_LETTER = r"([A-E])"


def _option_of_value(value: str, options: dict[str, str]) -> str | None:
    """The letter whose option text is `value` (same text, or mathematically equal: 21 = 21.0 = $21);
    None when no option or more than one matches."""
    def plain(text: str) -> str:
        return re.sub(r"[\s$]", "", text).lower()

    same = [letter for letter, text in options.items() if plain(text) == plain(value)]
    if not same:
        same = [letter for letter, text in options.items() if math_equal(value, text)]
    return same[0] if len(same) == 1 else None


def extract_choice(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter (A-E) a multiple-choice response settles on: from its last `\\boxed{}` if it has
    one (a letter, or with `options` — letter -> option text — a value that is exactly one option's), else
    the last "answer is C" / "answer: (C)", else a "(C)" that ends the response's last line (a letter
    mentioned anywhere else, e.g. while listing the options, is no answer); None when none is found."""
    boxed = extract_boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", boxed).strip()
        match = re.match(r"\(?" + _LETTER + r"\)?(?![A-Za-z0-9.])", inner)
        if match:
            return match.group(1)
        return _option_of_value(inner, options) if options and inner else None
    # Only "answer" is case-blind: a lowercase letter is a word ("the answer is a bit ..."), not an option.
    stated = re.findall(r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*\(?" + _LETTER + r"\)?(?![A-Za-z])", text)
    if stated:
        return stated[-1]
    lines = [line for line in text.splitlines() if line.strip()]
    final = re.search(r"\(" + _LETTER + r"\)[\s.!)*]*$", lines[-1]) if lines else None
    return final.group(1) if final else None


def extract_code(text: str) -> str:
    """The program in a response: the longest fenced code block tagged python (or untagged; any block if
    none is), a block left open by a cut-off response running to the end; the whole response when it has
    no fence at all."""
    blocks = re.findall(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", text, flags=re.DOTALL)
    if not blocks:
        return text
    python = [code for lang, code in blocks if lang.lower() in ("", "python", "py", "python3")]
    return max(python or [code for _lang, code in blocks], key=len)


def _math_verify_kwargs() -> tuple[dict, dict]:
    # math-verify's timeouts use SIGALRM, which only the main thread may install.
    on_main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if on_main else None}, {"timeout_seconds": 5 if on_main else None}


def _as_latex(answer: str) -> str:
    """The answer in math delimiters, which math-verify's LaTeX parser looks for (unless it has them)."""
    text = answer.strip()
    return text if len(text) > 1 and text.startswith("$") and text.endswith("$") else f"${text}$"


def math_equal(prediction: str, gold: str) -> bool:
    """Mathematical equivalence of two answers by math-verify (576 = 576.0, 1/2 = \\frac{1}{2} = 0.5,
    30^\\circ = 30, units dropped); False when either side does not parse."""
    from math_verify import parse, verify

    parse_kwargs, verify_kwargs = _math_verify_kwargs()
    gold_parsed = parse(_as_latex(gold), **parse_kwargs)
    prediction_parsed = parse(_as_latex(prediction), **parse_kwargs)
    if not gold_parsed or not prediction_parsed:
        return False
    return bool(verify(gold_parsed, prediction_parsed, **verify_kwargs))


def grade(response: str, gold: str, benchmark: str | None = None, options: dict[str, str] | None = None) -> Grade:
    """Grade one response against its gold answer by the benchmark's kind (see `benchmark_kind`):
    math: the last boxed answer is equivalent to the gold (no box: wrong); choice: the option letter
    (`extract_choice`, with the problem's `options` so that a boxed option value counts as its letter)
    equals the gold letter; code: the extracted program followed by the gold test script (which raises on
    failure) runs to its end in the sandbox (default limits): exit code 0 and the run's completion nonce,
    so a program that exits before the tests fails. Raises ConfigError where no sandbox is available."""
    kind = benchmark_kind(benchmark)
    if kind == "code":
        program = extract_code(response)
        if not program.strip():
            return Grade(None, False)
        result = run_python(program + "\n\n" + gold)
        return Grade(program, result.passed)
    if kind == "choice":
        letter = extract_choice(response, options)
        gold_letter = extract_choice(f"\\boxed{{{gold.strip()}}}")
        return Grade(letter, letter is not None and letter == gold_letter)
    boxed = extract_boxed(response)
    if boxed is None or not boxed.strip():
        return Grade(boxed, False)
    return Grade(boxed, math_equal(boxed, gold))


def grade_answer(response: str, gold: str, benchmark: str | None = None, options: dict[str, str] | None = None) -> bool:
    """True when `response` answers correctly by the benchmark's grader (`grade`); a benchmark of None or
    one that is neither multiple choice nor code (e.g. an extra, synthetic one) is graded as math.
    `options` maps option letters to their texts ({"A": "21", "B": "24", ...}) for multiple choice."""
    return grade(response, gold, benchmark, options).correct
