"""The stage engine (wmss.workflow) without Ray or MLflow: a stage runs once, a rerun skips it, a changed
setting re-runs it and, through the hash chain, everything downstream; an unfinished stage resumes; what a
stage prints goes to its log file, its `[wmss]` lines to the console as well; and no library module imports
a driver."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from wmss.config import WMSSConfig
from wmss.storage import RunStore
from wmss.workflow import Artifact, Manifest, Workflow, train_options


class _Tracker:
    """The part of wmss.tracking.Tracker the engine uses: a nested run per stage."""

    def __init__(self):
        self.runs = []

    @contextlib.contextmanager
    def stage(self, name, run_id=None, tags=None):
        self.runs.append((name, run_id))
        yield SimpleNamespace(run_id=run_id or f"run-{len(self.runs)}", log_metrics=lambda metrics: None)


def _pipeline(run_dir, capsys, *, seed: int, fail_in: str | None = None) -> tuple[list[str], str]:
    """Two chained stages, `make` (settings: seed) and `use` (input: make's file); returns the names of the
    stages whose function ran and the console."""
    ran = []

    def make(stage):
        ran.append("make")
        print("[wmss] make: detail for the console")
        print("chatter for the log only")
        (stage.dir / "out.txt").write_text(str(seed))
        return {"file": str(stage.dir / "out.txt"), "n": seed}

    def use(stage):
        ran.append("use")
        if fail_in == "use":
            raise RuntimeError("boom")
        return {"copy": made.path}

    store = RunStore(run_dir)
    wf = Workflow(WMSSConfig(), store, _Tracker(), Manifest(store))
    made = wf.stage("make", {"seed": seed, "betas": (0.9, 0.999)}, {}, make).artifact("file")
    wf.stage("use", {}, {"made": made, "absent": None}, use)
    return ran, capsys.readouterr().out


def test_runs_once_skips_on_rerun_and_reruns_what_changed_downstream(tmp_path, capsys):
    ran, out = _pipeline(tmp_path, capsys, seed=1)
    assert ran == ["make", "use"]
    assert out.splitlines() == ["[wmss] make: running", "[wmss] make: detail for the console",
                                "[wmss] make: done in 0 s", "[wmss] use: running", "[wmss] use: done in 0 s"]
    assert "chatter for the log only" in (tmp_path / "logs" / "make.log").read_text()
    manifest = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert manifest["make"]["outputs"] == {"file": "stages/make/out.txt", "n": 1}  # relative to the run dir
    assert manifest["use"]["inputs"] == {"made": manifest["make"]["hash"], "absent": ""}

    ran, out = _pipeline(tmp_path, capsys, seed=1)
    assert ran == [] and out.splitlines() == ["[wmss] make: finished earlier, skipped",
                                              "[wmss] use: finished earlier, skipped"]

    ran, out = _pipeline(tmp_path, capsys, seed=2)
    assert ran == ["make", "use"]
    assert "[wmss] make: re-running because seed: 1 -> 2" in out
    assert "[wmss] use: re-running because input made changed" in out


def test_an_unfinished_stage_resumes_in_its_mlflow_run(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="boom"):
        _pipeline(tmp_path, capsys, seed=1, fail_in="use")
    out = capsys.readouterr().out
    assert "[wmss] use: failed after 0 s" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert manifest["use"]["status"] == "running"
    ran, out = _pipeline(tmp_path, capsys, seed=1)
    assert ran == ["use"] and "[wmss] use: unfinished earlier, resuming" in out


def test_artifacts_and_train_options():
    model = Artifact("/m", "abc")
    assert model == ("/m", "abc") and model.hash == "abc"
    assert Artifact.external("hub/model-id") == Artifact("hub/model-id", "id:hub/model-id")
    cfg = WMSSConfig()
    assert cfg.sft.max_length is None and train_options(cfg, cfg.sft).max_length == cfg.max_length
    assert train_options(cfg, cfg.sft, neftune_alpha=5.0).neftune_alpha == 5.0


def test_no_library_module_imports_a_driver():
    library = Path(__file__).resolve().parent.parent / "wmss"
    importing = [f"{p.name}:{n}" for p in library.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if re.match(r"\s*from workflows\b", line)]
    assert importing == []
