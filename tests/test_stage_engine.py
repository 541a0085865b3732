"""The stage engine (wmss.workflow) without Ray or MLflow: a stage runs once, a rerun skips it, a changed
setting re-runs it and, through the hash chain, everything downstream; an unfinished stage resumes; what a
stage prints goes to its log file, its `[wmss]` lines to the console as well; a re-run keeps the finished
outputs until its own are sealed; `wmss stage reset` forgets a stage and what is downstream; folder
fingerprints survive a copy; one driver per run directory (lock file, heartbeat, takeover of an abandoned
lock, conditional manifest writes on S3); and no library module imports a driver."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from wmss.config import WMSSConfig
from wmss.storage import RunStore, StaleWrite
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


# ---- a re-run keeps the finished outputs until its own are sealed; `wmss stage reset` ----

def _stage(run_dir, seed: int, *, fail: bool = False, store=None):
    """One stage `make` (settings: seed) whose function leaves a checkpoint, then fails or writes out.txt;
    returns (its result or None, the checkpoints it found when it started)."""
    found = []

    def make(stage):
        found.extend(sorted(p.name for p in stage.dir.iterdir()))
        (stage.dir / f"ckpt-{seed}").write_text("")
        if fail:
            raise RuntimeError("killed")
        (stage.dir / "out.txt").write_text(str(seed))
        return {"file": str(stage.dir / "out.txt")}

    store = store or RunStore(run_dir)
    wf = Workflow(WMSSConfig(), store, _Tracker(), Manifest(store))
    try:
        return wf.stage("make", {"seed": seed}, {}, make), found
    except RuntimeError:
        return None, found


def test_a_rerun_keeps_the_finished_outputs_until_its_own_are_sealed(tmp_path, capsys):
    first, _ = _stage(tmp_path, 1)
    assert first.outputs["file"] == str(tmp_path / "stages/make/out.txt")
    assert _stage(tmp_path, 2, fail=True) == (None, [])  # a fresh folder: nothing of seed 1 to resume
    entry = json.loads((tmp_path / "manifest.json").read_text())["stages"]["make"]
    assert entry["status"] == "done" and entry["hash"] == first.hash  # still seed 1's outputs
    assert (tmp_path / "stages/make/out.txt").read_text() == "1"
    attempt = tmp_path / entry["attempt"]["dir"]
    assert attempt != tmp_path / "stages/make" and (attempt / "ckpt-2").exists()

    assert _stage(tmp_path, 2, fail=True)[1] == ["ckpt-2"]  # the same settings resume their own attempt
    assert _stage(tmp_path, 3, fail=True)[1] == [] and not attempt.exists()  # other settings: never resumed
    again, found = _stage(tmp_path, 1)  # back to seed 1: skipped, the abandoned attempt removed
    assert again.hash == first.hash and found == []
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["make"]

    second, found = _stage(tmp_path, 2)
    assert found == [] and Path(second.outputs["file"]).read_text() == "2"
    assert not (tmp_path / "stages/make").exists()  # replaced once the new outputs were sealed
    entry = json.loads((tmp_path / "manifest.json").read_text())["stages"]["make"]
    assert entry["outputs"]["file"] == f"{entry['dir']}/out.txt" and "attempt" not in entry
    third, _ = _stage(tmp_path, 3)
    assert third.outputs["file"] == str(tmp_path / "stages/make/out.txt") and not Path(second.outputs["file"]).exists()
    assert "[wmss] make: re-running because seed: 2 -> 3" in capsys.readouterr().out


def test_a_rerun_on_object_storage_replaces_the_remote_outputs_only_once_sealed(tmp_path, s3_bucket):
    from test_storage import _s3_names

    uri = f"s3://{s3_bucket}/run"
    _stage(None, 1, store=RunStore(uri, mirror=tmp_path / "a"))
    _stage(None, 2, fail=True, store=RunStore(uri, mirror=tmp_path / "b"))  # another machine
    names = _s3_names(uri)
    assert {"stages/make/out.txt", "stages/make/ckpt-1"} <= names and "manifest.json" in names
    done, _ = _stage(None, 2, store=RunStore(uri, mirror=tmp_path / "c"))
    rel = done.outputs["file"].split("/c/", 1)[1]
    assert not any(n.startswith("stages/make/") for n in _s3_names(uri)) and rel in _s3_names(uri)
    from wmss.cli import main

    assert main(["stage", "reset", uri, "make"]) == 0
    assert _s3_names(uri) == {"manifest.json"} and json.loads(RunStore(uri).read_tagged("manifest.json")[0]) == {
        "stages": {}}  # nor the lock's `driver` entry


def _chain(run_dir):
    """a -> b -> c, and d on its own."""
    store = RunStore(run_dir)
    wf = Workflow(WMSSConfig(), store, _Tracker(), Manifest(store))
    a = wf.stage("a", {}, {}, lambda s: {"n": 1})
    b = wf.stage("b", {}, {"a": Artifact("x", a.hash)}, lambda s: {"n": 2})
    wf.stage("c", {}, {"b": Artifact("x", b.hash), "none": None}, lambda s: {"n": 3})
    wf.stage("d", {}, {"model": Artifact.external("hub/x")}, lambda s: {"n": 4})


def test_stage_reset_forgets_the_stage_and_everything_downstream(tmp_path, capsys):
    from wmss.cli import main

    _chain(tmp_path)
    capsys.readouterr()
    assert main(["stage", "reset", str(tmp_path), "b"]) == 0
    assert capsys.readouterr().out == f"reset b\nreset c\nthe next run of {tmp_path} re-runs them\n"
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert sorted(stages) == ["a", "d"] and sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["a", "d"]
    assert not (tmp_path / "driver.lock").exists()
    _chain(tmp_path)
    assert [line.split(": ")[1] for line in capsys.readouterr().out.splitlines() if "done" not in line] == [
        "finished earlier, skipped", "running", "running", "finished earlier, skipped"]
    assert main(["stage", "reset", str(tmp_path), "nope"]) == 2
    assert "no stage 'nope'" in capsys.readouterr().err
    assert main(["stage", "reset", str(tmp_path / "elsewhere"), "a"]) == 2


# ---- one driver per run directory ----

_HOLD = ("import sys, time; from wmss.storage import RunStore; from wmss.workflow import hold_run_dir; "
         "hold_run_dir(RunStore(sys.argv[1])); print('held', flush=True); {then}")


def _holder(run_dir, then: str = "time.sleep(120)") -> subprocess.Popen:
    """Another driver process: it takes the run directory's lock, says so, then runs `then`."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(then=then), str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_driver_is_refused_naming_the_holder_until_its_process_is_gone(tmp_path, capsys):
    from wmss.cli import main
    from wmss.runlock import RunDirLocked
    from wmss.workflow import hold_run_dir

    other = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked) as refused:
            hold_run_dir(RunStore(tmp_path))
        assert f"host {socket.gethostname()}, pid {other.pid}, since 20" in str(refused.value)
        _chain(tmp_path / "run")
        (tmp_path / "run" / "driver.lock").write_text((tmp_path / "driver.lock").read_text())
        assert main(["stage", "reset", str(tmp_path / "run"), "a"]) == 1  # a locked run dir is not reset
        assert f"pid {other.pid}" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    manifest = hold_run_dir(RunStore(tmp_path))  # its process is gone: taken over, saying so
    assert f"taking over the lock of host {socket.gethostname()}, pid {other.pid}" in capsys.readouterr().out
    manifest.lock.release()
    assert not (tmp_path / "driver.lock").exists()


@pytest.mark.parametrize("ending", ["raise KeyboardInterrupt", "raise RuntimeError('boom')", "sys.exit(3)",
                                    "import os, signal; os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)"])
def test_the_lock_is_released_when_the_driver_ends(tmp_path, ending):
    proc = _holder(tmp_path, then=ending)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and not (tmp_path / "driver.lock").exists()


def test_a_lock_of_another_host_is_taken_over_only_after_its_heartbeat_expires(tmp_path, monkeypatch, capsys):
    from wmss import runlock
    from wmss.runlock import LockLost, RunDirLocked
    from wmss.workflow import hold_run_dir

    other = {"host": "node-7", "pid": 4242, "since": time.time() - 600, "token": "t", "start": None}
    (tmp_path / "driver.lock").write_text(json.dumps({**other, "heartbeat": time.time() - 10}))
    with pytest.raises(RunDirLocked, match=r"host node-7, pid 4242, since .* UTC \(last heartbeat 1\d s ago\)"):
        hold_run_dir(RunStore(tmp_path))
    (tmp_path / "driver.lock").write_text(json.dumps({**other, "heartbeat": time.time() - 400}))
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    manifest = hold_run_dir(RunStore(tmp_path))
    assert "taking over the lock of host node-7, pid 4242" in capsys.readouterr().out
    held = json.loads((tmp_path / "driver.lock").read_text())
    time.sleep(0.5)
    assert json.loads((tmp_path / "driver.lock").read_text())["heartbeat"] > held["heartbeat"]  # refreshed
    (tmp_path / "driver.lock").write_text(json.dumps({**other, "heartbeat": time.time()}))  # this driver hung
    with pytest.raises(LockLost, match="taken over by another driver .host node-7"):
        manifest.save()
    manifest.lock.release()
    assert json.loads((tmp_path / "driver.lock").read_text())["host"] == "node-7"  # not ours to remove



def test_a_heartbeat_that_cannot_be_written_is_tried_again(tmp_path, monkeypatch, capsys):
    from wmss import runlock
    from wmss.workflow import hold_run_dir

    failures = iter([OSError(28, "No space left on device")] * 3)
    real_atomic_path = runlock.atomic_path

    def full_disk_for_a_while(path):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_atomic_path(path)

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(runlock, "atomic_path", full_disk_for_a_while)
    manifest = hold_run_dir(RunStore(tmp_path))
    held = json.loads((tmp_path / "driver.lock").read_text())["heartbeat"]
    time.sleep(0.6)
    assert json.loads((tmp_path / "driver.lock").read_text())["heartbeat"] > held  # beating again
    manifest.lock.release()
    assert capsys.readouterr().out.count("cannot refresh its heartbeat ([Errno 28] No space left on device)") == 1
    assert next(failures, None) is None and not (tmp_path / "driver.lock").exists()
    manifest = hold_run_dir(RunStore(tmp_path))  # released, so free again
    manifest.lock.release()


def test_object_store_manifest_writes_are_conditional(tmp_path, s3_bucket, capsys):
    import boto3

    from wmss.runlock import RunDirLocked
    from wmss.workflow import hold_run_dir

    uri = f"s3://{s3_bucket}/run"
    late = Manifest(RunStore(uri, mirror=tmp_path / "late"))  # read before the first driver claims the run
    first = hold_run_dir(RunStore(uri, mirror=tmp_path / "first"))
    with pytest.raises(RunDirLocked, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
        late.save()
    first.update("x", status="done")  # its own writes go through
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="run/manifest.json", Body=b'{"stages": {}}')
    with pytest.raises(RunDirLocked, match="another driver wrote its manifest since this one read it"):
        first.update("y", status="done")
    first.lock.release()

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="run/manifest.json", Body=json.dumps({"stages": {}, "driver": {
        "host": "node-7", "pid": 1, "since": 0, "heartbeat": time.time(), "token": "t", "start": None}}).encode())
    with pytest.raises(RunDirLocked, match="host node-7, pid 1"):
        hold_run_dir(RunStore(uri, mirror=tmp_path / "third"))

    store = RunStore("memory://wmss-test/run")  # a store without conditional writes: compared before writing
    version = store.write_if("manifest.json", b"{}", None)
    assert store.read_tagged("manifest.json") == (b"{}", version)
    with pytest.raises(StaleWrite):
        store.write_if("manifest.json", b"[]", None)
    store.write_if("manifest.json", b"[]", version)
