"""What `wmss run` prints: one line per stage event and the results table, no line twice, nothing of Ray's
own logs; those are in the run directory's log files. The run is the session's uninterrupted Phase 3 and
evaluation on top of the shared demo run (conftest `demo_phase3_run`): Ray Train, Ray Data and MLflow all run."""

from __future__ import annotations

import re

import pytest
from conftest import BEFORE_PHASE3

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# what Ray's logs look like: a worker's prefix, a log record's level, Ray Data's progress. (Ray's C++ core
# writes its own ERROR lines to the driver's stderr, e.g. core_worker.cc's warning about an actor pool's
# constructor arguments in the object store once per scoring stage: no Python setting reaches those.)
RAY_LOG_LINE = re.compile(r"\(\w*\s*pid=|\b(INFO|WARNING|DEBUG)\b|Running Dataset|logging_progress")


def test_console_is_one_line_per_stage_event_and_ray_logs_go_to_the_run_dir(demo_phase3_run):
    run_dir, done = demo_phase3_run["run_dir"], demo_phase3_run["done"]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), f"a line printed twice:\n{done.stdout}"
    assert not [line for line in done.stdout.splitlines() + done.stderr.splitlines() if RAY_LOG_LINE.search(line)], (
        f"Ray's logs on the console:\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    events = [line for line in lines if line.startswith("[wmss] ") and ": " in line]
    assert [f"[wmss] {stage}: finished earlier, skipped" for stage in BEFORE_PHASE3] == events[:len(BEFORE_PHASE3)]
    for stage in ("r1.jtws", "eval.wmss"):
        assert f"[wmss] {stage}: running" in lines
        assert any(re.fullmatch(rf"\[wmss\] {re.escape(stage)}: done in \d+ s", line) for line in lines)
    assert len(done.stdout) + len(done.stderr) < 3000, "the console grew: a new kind of line reached it"

    logs = run_dir / "logs"
    assert "jtws step 1:" in (logs / "ray-workers.log").read_text()  # what Ray's workers printed
    assert "Connecting to existing Ray cluster" in (logs / "ray.log").read_text()  # the driver's Ray loggers
    assert (logs / "r1.jtws.log").exists() and (logs / "eval.wmss.log").exists()
