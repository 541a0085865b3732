"""Evaluation: benchmarks and the paper's prompt protocol, generation on Ray Data (vLLM or HF), graders
(math equivalence, option letters, sandboxed code execution) and the `wmss eval` command."""

from wmss.evaluation.grading import grade_answer
from wmss.evaluation.harness import evaluate

__all__ = ["evaluate", "grade_answer"]
