"""Live: `wmss submit --wait` of the reduced demo to a Ray cluster this test starts with `ray start --head`.

The cluster is the test's own: explicit free ports on 127.0.0.1 (other Ray instances may run on this
machine), a short temp dir under /tmp, a fresh auth token given to `ray start` and to `wmss submit` through
RAY_AUTH_TOKEN (as a user does with a cluster's token), and MLFLOW_TRACKING_URI in the cluster's environment
(jobs inherit it). It is stopped by killing the processes whose environment or command line names its temp
root, never with `ray stop`, which would stop every Ray of this user.

The submitted run directory starts with the stages before Phase 3 of the session's shared demo run
(conftest `demo_before_phase3`) and their MLflow runs in the cluster's tracking database, as a run submitted
again under the same name finds them: the job skips them, runs Phase 3 and the evaluation on the cluster and
logs them under the same parent run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REDUCED_DEMO, seed_run

# Named ports of one Ray head, then the range its workers listen on (one port per worker process).
NAMED_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "runtime-env-agent-port", "node-manager-port", "object-manager-port", "metrics-export-port",
               "ray-client-server-port")
WORKER_PORTS = 200
REPO = Path(__file__).resolve().parents[1]


def _free_port_block(size: int) -> int:
    """The first port of `size` consecutive ports that are all free on 127.0.0.1, below Linux's ephemeral
    range (so outgoing connections do not take them meanwhile)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - size)
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports in 20000-32000")


def _cluster_pids(root: str) -> list[int]:
    """PIDs of this user's processes that belong to the Ray started under `root`: those whose environment
    or command line names `root`. Every Ray process inherits `ray start`'s environment, which holds root
    (MLFLOW_TRACKING_URI), while Ray rewrites worker command lines to `ray::...`."""
    marker = root.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid == os.getuid() and (
                    marker in (entry / "environ").read_bytes() or marker in (entry / "cmdline").read_bytes()):
                pids.append(int(entry.name))
        except OSError:  # the process ended meanwhile
            continue
    return pids


def _kill_cluster(root: str) -> None:
    """Stop the Ray started under `root`: SIGTERM to its processes, then SIGKILL to any still alive."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _cluster_pids(root):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while (alive := _cluster_pids(root)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive:
            return
    raise RuntimeError(f"processes of the test's Ray survived SIGKILL: {alive}")


@pytest.fixture
def live_cluster():
    """A Ray head on 127.0.0.1 with the job API; yields (dashboard address, environment for `wmss`, root)."""
    # Ray's socket paths must stay short: the root lives directly under /tmp, not in pytest's tmp_path.
    root = tempfile.mkdtemp(prefix="wmss-live-")
    base = _free_port_block(len(NAMED_PORTS) + WORKER_PORTS)
    ports = dict(zip(NAMED_PORTS, range(base, base + len(NAMED_PORTS))))
    workers = base + len(NAMED_PORTS)
    token = secrets.token_hex(32)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({
        # An activated virtualenv: the job's shell finds `wmss` (and this Python) on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    })
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray, "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=4", "--num-gpus=0",
               f"--temp-dir={root}/ray", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + WORKER_PORTS - 1}",
               "--disable-usage-stats", *(f"--{name}={port}" for name, port in ports.items())]
    try:
        started = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env, root
    finally:
        _kill_cluster(root)
        shutil.rmtree(root, ignore_errors=True)


def test_no_runtime_env_pip_sends_no_requirements():
    import argparse

    from wmss import submit

    parser = argparse.ArgumentParser()
    submit.add_submit_arguments(parser)
    assert parser.parse_args([]).runtime_env_pip is True
    args = parser.parse_args(["--no-runtime-env-pip", "--set", "run_dir=/mnt/runs"])
    plain = submit.build_submission(None, args.overrides, "r", root=REPO, environ={}, pip=args.runtime_env_pip)
    with_pip = submit.build_submission(None, args.overrides, "r", root=REPO, environ={})
    assert "pip" not in plain.runtime_env
    assert with_pip.runtime_env == {**plain.runtime_env, "pip": submit.pinned_requirements(REPO / "pyproject.toml")}


@pytest.mark.ray
@pytest.mark.slow
def test_submit_reduced_demo_succeeds_and_logs_to_mlflow(live_cluster, demo_before_phase3):
    from mlflow.tracking import MlflowClient

    address, env, root = live_cluster
    run = "live-demo"
    seed_run(demo_before_phase3, Path(root) / "runs" / run,
             mlflow_db=Path(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")))
    command = [str(Path(sys.executable).parent / "wmss"), "submit", "--address", address, "--wait",
               "--no-runtime-env-pip", "--name", run, "--set", *REDUCED_DEMO, "jtws.training.global_batch=8",
               "baselines.methods=[]", "eval.methods=[wmss]", f"run_dir={root}/runs"]
    start, start_ms = time.monotonic(), time.time() * 1000
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    took = time.monotonic() - start
    assert done.returncode == 0, f"wmss submit failed after {took:.0f} s:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.rstrip().endswith(f"{run}: SUCCEEDED")
    assert env["RAY_AUTH_TOKEN"] not in done.stdout + done.stderr

    run_dir = Path(root) / "runs" / run
    assert (run_dir / "results.json").is_file()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["wmss.run_dir"] == str(run_dir)
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {"sft", "r1.score", "r1.select", "r1.jtws", "eval.wmss"} <= {r.data.tags["wmss.stage"] for r in stages}
    assert all(r.info.status == "FINISHED" for r in stages)
    ran = {r.data.tags["wmss.stage"] for r in stages if r.info.start_time >= start_ms}  # by the job itself
    assert ran == {"r1.jtws", "eval.wmss"}, ran
