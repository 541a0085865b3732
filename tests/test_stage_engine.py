"""The stage engine (wmss.workflow) without Ray or MLflow: a stage runs once, a rerun skips it, a changed
setting re-runs it and, through the hash chain, everything downstream; an unfinished stage resumes; what a
stage prints goes to its log file, its `[wmss]` lines to the console as well; and no library module imports
a driver."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from wmss.config import WMSSConfig
from wmss.storage import RunStore
from wmss.workflow import SMALL_FILE, Artifact, Manifest, Workflow, fingerprint, train_options


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



def test_a_folder_fingerprint_survives_a_copy_and_sees_every_edit(tmp_path, monkeypatch):
    monkeypatch.setenv("WMSS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"hidden": 128}')
    (model / "sub" / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(SMALL_FILE + 4096))  # hashed once, then cached
    original = fingerprint(str(model))
    assert len(list((tmp_path / "cache" / "fingerprints").iterdir())) == 1
    for i, flags in enumerate(("-a", "-r")):  # -r: new mtimes and inodes
        subprocess.run(["cp", flags, str(model), str(tmp_path / f"copy{i}")], check=True)
        assert fingerprint(str(tmp_path / f"copy{i}")) == original
    assert fingerprint(str(model)) == original and fingerprint(str(model / "config.json")) != original

    def edited(rel: str, offset: int) -> str:
        target = tmp_path / "copy1" / rel
        st = target.stat()
        with open(target, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 1]))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and mtime
        return fingerprint(str(tmp_path / "copy1"))

    assert edited("sub/tokenizer.json", 1) != original
    assert edited("sub/tokenizer.json", 1) == original  # flipped back
    assert edited("model.safetensors", SMALL_FILE) != original
    (tmp_path / "copy0" / "extra.txt").write_text("")
    assert fingerprint(str(tmp_path / "copy0")) != original


def test_no_library_module_imports_a_driver():
    library = Path(__file__).resolve().parent.parent / "wmss"
    importing = [f"{p.name}:{n}" for p in library.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if re.match(r"\s*from workflows\b", line)]
    assert importing == []
