"""Joining or starting Ray: the one place every command's `--ray-address` goes through."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process: to `address` when given (or RAY_ADDRESS when set), else start a
    local instance (`num_cpus` caps it; default: all cores). A process that already called ray.init keeps
    its connection (tests and the driver workflow start Ray themselves)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # with the dashboard (Ray's default): Ray Train's placement-group cleaner asks the State API
        # whether a Train controller is alive; without it, a Tune trial stopped early leaks its workers'
        # placement group and the next trial waits for those CPUs forever
        ray.init(num_cpus=num_cpus, log_to_driver=True)
