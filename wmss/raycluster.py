"""Joining or starting Ray, and where Ray's logs go: the one place every command's `--ray-address` goes
through.

Given a log folder (a workflow's `<run_dir>/logs`), Ray's own logs stay off the console: the driver's Ray
loggers write to `ray.log` there, and what Ray's workers and actors print (Ray forwards it to the driver)
to `ray-workers.log`; only the workers' `ray.experimental.tqdm_ray` bars are drawn, on a terminal. Ray
Data's own progress bars are always off: each stage draws one bar of its own (training steps, scoring
samples, evaluation samples).

Why a Ray Train worker's print used to reach the console twice: Ray Train (V2) patches `print` on its
workers to log through the root logger, whose console handler writes it to stderr, and tees it to the
worker's redirected stdout as well; Ray forwards both. A locally started Ray gets
RAY_TRAIN_ENABLE_PRINT_PATCH=0, so its workers print once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path

def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, log_dir: str | os.PathLike | None = None) -> None:
    """Connect to Ray once per process: to `address` when given (or RAY_ADDRESS when set), else start a
    local instance (`num_cpus` caps it; default: all cores). A process that already called ray.init keeps
    its connection and its logging (tests start Ray themselves). `log_dir`: where Ray's logs go instead of
    the console (see the module docstring)."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # datasets made from now on: no Ray Data bars
    if ray.is_initialized():
        return
    if log_dir is not None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        # the libraries that configure their own loggers (Ray Data) are imported above, so theirs exist
        log_to_file(log_dir / "ray.log", ("ray", "ray.data", "ray.train", "ray.tune"))
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # see above; the local raylet, so every worker, inherits it
        # one machine started here is never drained: no preemption-watcher actor per training stage
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # with the dashboard (Ray's default): Ray Train's placement-group cleaner asks the State API
        # whether a Train controller is alive; without it, a Tune trial stopped early leaks its workers'
        # placement group and the next trial waits for those CPUs forever
        ray.init(num_cpus=num_cpus, log_to_driver=True)
    if log_dir is not None:
        _forward_worker_output(log_dir / "ray-workers.log")


def log_to_file(path: str | os.PathLike, names: tuple[str, ...]) -> None:
    """The loggers `names` (and their children) write to the file `path` instead of the console: their
    console handlers are removed, and the file is added where records stop propagating."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in names:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
        if name == names[0] or not logger.propagate:
            logger.addHandler(handler)


def _forward_worker_output(path: Path) -> None:
    """What Ray forwards from workers and actors: lines to `path`; tqdm_ray bars drawn when stderr is a
    terminal. Ray has no public hook for this: its driver-side printer is swapped for ours."""
    from ray._private.worker import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler(
        "wmss_worker_logs", functools.partial(_write_worker_lines, open(path, "a", buffering=1),
                                              _WorkerBars() if sys.stderr.isatty() else None))


class _WorkerBars:
    """The workers' tqdm_ray bars (each a JSON state line: desc, total, unit, x, closed, uuid), drawn here
    as plain tqdm bars that vanish when closed."""

    def __init__(self):
        self.bars = {}

    def update(self, state: dict) -> None:
        from tqdm import tqdm

        bar = self.bars.get(state["uuid"])
        if bar is None:
            bar = self.bars[state["uuid"]] = tqdm(desc=state["desc"], total=state["total"], unit=state["unit"],
                                                  leave=False, dynamic_ncols=True)
        bar.update(state["x"] - bar.n)
        if state["closed"]:
            self.bars.pop(state["uuid"]).close()


def _write_worker_lines(log, bars: _WorkerBars | None, data: dict) -> None:
    import json

    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    source = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({source} pid={data.get('pid')}, ip={data.get('ip')})".replace("( ", "(")
    for line in data.get("lines", []):
        if RAY_TQDM_MAGIC in line:
            if bars is not None:
                with contextlib.suppress(ValueError):  # a state line cut by a too-fast writer: the next one
                    bars.update(json.loads(line))
        else:
            log.write(f"{prefix}{' [stderr]' if data.get('is_err') else ''} {line}\n")
