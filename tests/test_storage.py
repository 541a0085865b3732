"""Run directories on object storage, against a real S3-compatible server (moto, on 127.0.0.1): the store's
upload/download/seal rules, then `wmss run --run-dir s3://...` killed during Phase 3 and resumed from a
fresh local mirror (another machine): the finished stages are fetched from S3, JTWS resumes from the
checkpoints Ray Train wrote to S3, the Ray workers (whose WMSS_CACHE differs from the driver's, as another
node's would) fetch the models themselves, and the run ends with its results in the bucket. The bucket's run
directory starts with the stages before Phase 3 uploaded from the session's shared demo run (conftest
`demo_before_phase3`), sealed as the driver seals them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REDUCED_DEMO, seed_run

from wmss.storage import SEAL, Localizer, RunStore, filesystem, is_uri, list_names, localize

REPO = Path(__file__).resolve().parent.parent


def _s3_names(uri: str) -> set[str]:
    """Every object under `uri`, relative to it."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    return {info.path[len(root) + 1:] for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if info.type == pafs.FileType.File}


def test_locations():
    assert is_uri("s3://b/run") and is_uri("gs://b/run") and not is_uri("/data/run")
    assert not is_uri("file:///data/run") and not is_uri("runs/demo")
    fs, path = filesystem("memory://wmss/run")  # no pyarrow filesystem for it: fsspec's, wrapped
    assert type(fs).__name__ == "PyFileSystem" and path.endswith("wmss/run")
    with pytest.raises(ValueError, match="nosuchscheme://x"):
        filesystem("nosuchscheme://x/y")


def test_s3_store_uploads_sealed_folders_and_fetches_only_matching_ones(tmp_path, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/one"
    store = RunStore(uri, mirror=tmp_path / "a")
    assert store.durable("stages/x") == f"{uri}/stages/x" and str(store) == uri
    (store.local / "stages" / "x" / "model").mkdir(parents=True)
    (store.local / "stages" / "x" / "model" / "w.bin").write_bytes(b"\0" * 1000)
    store.seal("stages/x", "hash-1")
    assert _s3_names(uri) == {f"stages/x/{SEAL}", "stages/x/model/w.bin"}
    assert list_names(f"{uri}/stages/x") == [SEAL, "model"] and list_names(f"{uri}/nothing") == []

    (store.local / "stages" / "flat").mkdir()
    (store.local / "stages" / "flat" / "train.jsonl").write_text("{}\n")  # files only, no sub-folder
    store.seal("stages/flat", "hash-f")

    other = RunStore(uri, mirror=tmp_path / "b")  # another machine: an empty mirror
    other.fetch("stages/x", "hash-1")
    other.fetch("stages/flat", "hash-f")
    assert (other.local / "stages/x/model/w.bin").read_bytes() == b"\0" * 1000
    assert (other.local / "stages/flat/train.jsonl").read_text() == "{}\n"
    with pytest.raises(RuntimeError, match=rf"{uri}/stages/x: not the finished output hash-2"):
        RunStore(uri, mirror=tmp_path / "c").fetch("stages/x", "hash-2")
    assert not (tmp_path / "c" / "stages" / "x").exists()  # nothing half-trusted is left behind

    assert not other.pull("stages/missing")
    other.remove("stages/x")
    assert _s3_names(uri) == {f"stages/flat/{SEAL}", "stages/flat/train.jsonl"}
    assert not (other.local / "stages" / "x").exists()


def test_localizer_gives_a_worker_its_own_nodes_copy(tmp_path, s3_bucket, monkeypatch):
    uri = f"s3://{s3_bucket}/runs/two"
    driver = RunStore(uri, mirror=tmp_path / "driver")
    (driver.local / "stages" / "sft" / "model").mkdir(parents=True)
    (driver.local / "stages" / "sft" / "model" / "config.json").write_text("{}")
    driver.seal("stages/sft", "k1")
    localizer = Localizer(uri, str(driver.local), (("stages/sft", "k1"),))
    monkeypatch.setenv("WMSS_CACHE", str(tmp_path / "worker-node"))  # what a worker on another node has
    local = Path(localize(localizer, str(driver.local / "stages/sft/model")))
    assert local.is_relative_to(tmp_path / "worker-node") and (local / "config.json").read_text() == "{}"
    assert localize(localizer, "/models/base") == "/models/base" and localize(None, "x") == "x"
    assert localizer.remote(str(driver.local / "stages/sft/model")) == f"{uri}/stages/sft/model"


def test_local_store_is_its_own_copy(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.uri is None and store.durable("stages/x") == str(tmp_path / "run" / "stages" / "x")
    store.seal("stages/x", "k")
    store.fetch("stages/x", "other")  # a local run directory is never replaced from elsewhere
    assert (tmp_path / "run" / "stages" / "x" / SEAL).read_text() == "k"
    assert store.relative(tmp_path / "run" / "stages" / "x") == "stages/x" and store.relative("/elsewhere") is None


def test_object_store_run_needs_a_tracking_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "wmss.cli", "run", "--run-dir", "s3://bucket/run"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "mlflow.tracking_uri: not set" in done.stderr + done.stdout


REDUCED = [*REDUCED_DEMO, "jtws.training.global_batch=2", "jtws.training.checkpoint_every=1",
           "jtws.training.max_failures=2", "baselines.methods=[]", "eval.methods=[wmss]"]


@pytest.mark.ray
@pytest.mark.slow
def test_workflow_on_s3_resumes_on_another_machine(tmp_path, s3_bucket, ray_local, demo_before_phase3):
    uri = f"s3://{s3_bucket}/runs/demo"
    seed_run(demo_before_phase3, uri)
    address = ray_local.get_runtime_context().gcs_address

    def wmss_run(cache: Path, log: Path) -> subprocess.Popen:
        env = {**os.environ, "WMSS_CACHE": str(cache), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        cmd = [sys.executable, "-m", "wmss.cli", "run", "--run-dir", uri, "--set", *REDUCED, f"ray.address={address}"]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def stages() -> dict:
        try:
            return json.loads(RunStore(uri, mirror=tmp_path / "peek").fs.open_input_file(
                f"{s3_bucket}/runs/demo/manifest.json").read())["stages"]
        except FileNotFoundError:
            return {}

    def jtws_checkpoints() -> list[str]:
        return [n for n in list_names(f"{uri}/stages/r1.jtws/model.checkpoints") if n.startswith("checkpoint_")]

    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    proc = wmss_run(tmp_path / "machine-a", first_log)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:  # kill once JTWS has a checkpoint in S3
        if stages().get("r1.jtws", {}).get("status") == "running" and jtws_checkpoints():
            break
        time.sleep(2)
    assert proc.poll() is None, "the run ended before Phase 3 could be interrupted:\n" + first_log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(10)  # let Ray reap the killed job's actors
    assert jtws_checkpoints()

    proc = wmss_run(tmp_path / "machine-b", second_log)
    assert proc.wait(timeout=900) == 0, second_log.read_text()[-4000:]
    out = second_log.read_text()
    for stage in ("demo.data", "demo.base", "sft", "r1.score", "r1.select"):
        assert f"[wmss] {stage}: finished earlier, skipped" in out
    # the driver fetched what JTWS reads from S3, nothing else (workers print their own fetches, prefixed)
    fetched = {line.split(f"{uri}/", 1)[1].strip() for line in out.splitlines() if line.startswith("[wmss] fetched ")}
    assert fetched == {"stages/demo.data", "stages/demo.base", "stages/sft", "stages/r1.select"}, out[-3000:]
    assert "[wmss] r1.jtws: unfinished earlier, resuming" in out
    assert f"[wmss] jtws: resuming from the latest checkpoint in {uri}/stages/r1.jtws/model.checkpoints" in out

    # the Ray workers (another WMSS_CACHE: another machine) fetched the models into their own mirror
    workers = RunStore(uri).local
    assert workers != (tmp_path / "machine-b").resolve() / "runs" / workers.name
    for model in ("stages/demo.base/model", "stages/sft/model"):
        assert (workers / model / "model.safetensors").is_file()

    names = _s3_names(uri)
    assert {"manifest.json", "config.yaml", "results.json", "results.txt", f"stages/r1.jtws/{SEAL}",
            "stages/r1.jtws/model/model.safetensors", "stages/eval.wmss/summary.json"} <= names
    assert all(s["status"] == "done" for s in stages().values())
    assert not (tmp_path / "machine-b" / "mlflow.db").exists()  # tracking went to the configured server
