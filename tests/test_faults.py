"""Fault injection on CPU, with the real Ray, DeepSpeed (gloo) and MLflow: a Ray Train worker process killed
mid-step, the `wmss run` driver killed at seeded random points of Phase 3 and the evaluation, and a run
directory whose disk fills up. Each interrupted run must end exactly as an uninterrupted one (gloo on CPU is
deterministic: the final weights are compared bitwise), or fail clearly without sealing anything incomplete.

WMSS_FAULT_POINTS (default 3) and WMSS_FAULT_SEED (default 0) choose how many driver kills and where."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import PHASE3_DEMO, REPO, RESUME_FLAGS, manifest_stages, seed_run, wmss_run_command

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FAULT_POINTS = int(os.environ.get("WMSS_FAULT_POINTS", "3"))
FAULT_SEED = int(os.environ.get("WMSS_FAULT_SEED", "0"))
FULL_DISK_HEADROOM = 4 << 20  # bytes free on the volume: the driver starts, Phase 3's checkpoints do not fit
STAGE_STARTS = re.compile(r"\[wmss\] \S+: (running|unfinished earlier, resuming|re-running)")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(want: Path, got: Path) -> None:
    want, got = _weights(want), _weights(got)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_killed_train_worker_restarts_from_its_last_checkpoint(sft_reference, tiny_model_dir, demo_rows, tmp_path):
    """SIGKILL one Ray Train worker process after the run has checkpointed (max_failures=1): the worker group
    restarts from the last checkpoint and the final weights equal the uninterrupted run's, bitwise."""
    import ray
    from ray.util.state import list_actors

    from wmss.config import TrainingConfig
    from wmss.training import sft_heads, train

    checkpoints, out = tmp_path / "model.checkpoints", tmp_path / "model"
    job = ray.get_runtime_context().get_job_id()
    killed = []

    def kill_a_worker():
        deadline = time.time() + 300
        # two checkpoint folders: the first is registered, so the restart has one to resume from
        while len(list(checkpoints.glob("checkpoint_*"))) < 2 and time.time() < deadline:
            time.sleep(0.2)
        workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                   if a.job_id == job]
        if workers and not out.exists():
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    train(sft_heads(tiny_model_dir), name="sft", data=demo_rows, out=out,
          options=TrainingConfig(**RESUME_FLAGS, max_failures=1))
    killer.join()
    assert killed, "no worker was killed: the run finished first"
    _assert_same_weights(sft_reference, out)


def _stage_work_began(log: Path) -> bool:
    return log.exists() and STAGE_STARTS.search(log.read_text()) is not None


def test_driver_killed_at_random_points_ends_as_an_uninterrupted_run(tmp_path, demo_before_phase3, demo_phase3_run):
    """Phase 3 and the evaluation on a copy of the shared run, the driver SIGKILLed at FAULT_POINTS seeded
    random moments of their work and rerun each time: the final run's models and results equal the
    uninterrupted run's (conftest `demo_phase3_run`)."""
    reference = demo_phase3_run["run_dir"]
    work_s = sum(s["wall_s"] for name, s in manifest_stages(reference).items() if "wall_s" in s
                 and name not in manifest_stages(demo_before_phase3))
    rng = random.Random(FAULT_SEED)
    points = sorted(rng.uniform(0, work_s) for _ in range(FAULT_POINTS))
    run_dir = tmp_path / "run"
    seed_run(demo_before_phase3, run_dir)
    cmd, env = wmss_run_command(run_dir, *PHASE3_DEMO)
    killed_in, previous = [], 0.0
    for i, point in enumerate(points):
        log = tmp_path / f"attempt-{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        while proc.poll() is None and not _stage_work_began(log):
            time.sleep(0.1)
        # the point on the uninterrupted run's clock of stage work: this attempt continues from the last one's
        time.sleep(point - previous)
        previous = point
        if proc.poll() is None:
            running = [name for name, s in manifest_stages(run_dir).items() if s.get("status") == "running"]
            os.killpg(proc.pid, signal.SIGKILL)
            killed_in.append(running)
        proc.wait()
        time.sleep(3)  # let Ray reap the killed driver's job
    print(f"driver killed at {[round(p, 1) for p in points]} s of {work_s:.0f} s of stage work, in {killed_in}")
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert killed_in, "every attempt finished before its kill"
    stages = manifest_stages(run_dir)
    assert stages.keys() == manifest_stages(reference).keys() and all(s["status"] == "done" for s in stages.values())
    _assert_same_weights(reference / "stages" / "r1.jtws" / "model", run_dir / "stages" / "r1.jtws" / "model")
    assert json.loads((run_dir / "results.json").read_text()) == json.loads((reference / "results.json").read_text())
    predictions = Path("stages") / "eval.wmss" / "predictions" / "synthetic.jsonl"
    assert (run_dir / predictions).read_text() == (reference / predictions).read_text()


def _mount_tmpfs(folder: Path, size: int, remount: bool = False) -> bool:
    options = f"remount,size={size}" if remount else f"size={size}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_full_disk_fails_clearly_seals_nothing_and_a_rerun_with_space_finishes(tmp_path, demo_before_phase3,
                                                                               demo_phase3_run):
    """The run directory on a small tmpfs that Phase 3's checkpoints overflow: `wmss run` fails with one line
    naming the path that could not be written, Phase 3 is not marked done and no final model is left where a
    rerun would trust it; the same volume grown, the rerun finishes with the uninterrupted run's model."""
    import shutil

    volume = tmp_path / "volume"
    volume.mkdir()
    if not _mount_tmpfs(volume, 1 << 30):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN) here")
    try:
        run_dir = volume / "run"
        seed_run(demo_before_phase3, run_dir)
        assert _mount_tmpfs(volume, shutil.disk_usage(volume).used + FULL_DISK_HEADROOM, remount=True)
        cmd, env = wmss_run_command(run_dir, *PHASE3_DEMO)
        full = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        ours = [line for line in full.stderr.splitlines() if line.startswith("wmss run:")]
        assert full.returncode == 1 and len(ours) == 1, full.stdout[-3000:] + full.stderr[-3000:]
        assert "no space left" in ours[0].lower() and str(volume) in ours[0], ours[0]
        print(ours[0])
        jtws = manifest_stages(run_dir)["r1.jtws"]
        assert jtws["status"] == "running" and "eval.wmss" not in manifest_stages(run_dir)
        assert not (run_dir / "stages" / "r1.jtws" / "model").exists()
        assert not (run_dir / "stages" / "r1.jtws" / ".wmss-finished").exists()

        assert _mount_tmpfs(volume, 1 << 30, remount=True)
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        _assert_same_weights(demo_phase3_run["run_dir"] / "stages" / "r1.jtws" / "model",
                             run_dir / "stages" / "r1.jtws" / "model")
    finally:
        subprocess.run(["umount", "--lazy", str(volume)], check=False)
