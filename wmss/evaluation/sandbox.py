"""A sandbox for generated code. `run_python` executes a program in a separate process group with resource
limits (CPU time, address space, file size, process count), in a fresh temporary working directory, with
no network and a wall-clock timeout that kills the whole group.

Isolation in force (`SandboxResult.isolation`):
- "namespaces" (running as root where unshare is allowed, e.g. CI): new network namespace (no interfaces
  up), PID namespace (the program is its init, so everything it started dies with it), mount namespace with
  fresh tmpfs over /tmp, /var/tmp, /dev/shm and /run/lock, and the `nobody` user (root is exempt from the
  process-count limit and could write the host's files).
- "guards" (elsewhere): the same limits in the invoking user's name, with Python's socket constructors
  refused. Files the invoking user may write stay writable, and a process that leaves the group escapes
  the timeout kill; run untrusted code as root in a container to get the namespaces.
Both disable process-spawning calls at the Python level (os.system, subprocess, os.fork, ...).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
_ISOLATION_MARKER = "wmss-sandbox-isolation="  # stderr lines the launcher writes for this module
_TIMEOUT_MARKER = "wmss-sandbox-timeout"
_BACKSTOP_SECONDS = 5.0  # how long past the wall clock the launcher may take before it is killed from here


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space; a bare interpreter needs ~30 MB of it
    file_bytes: int = 16 << 20  # largest file the program may write, stdout and stderr included
    processes: int = 16  # processes of the sandbox user (the invoking user's whole count in "guards" mode)
    output_bytes: int = 64 << 10  # how much of stdout and of stderr comes back


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when the wall-clock timeout killed the program
    stdout: str
    stderr: str
    isolation: str  # "namespaces" or "guards" (see the module docstring)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def passed(self) -> bool:
        return self.returncode == 0


def _read_head(file, limit: int) -> str:
    file.seek(0)
    return file.read(limit).decode("utf-8", errors="replace")


def _live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies (a zombie holds no resources; its reaper, possibly
    the host's init, collects it)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _kill_group(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group until no live process is left in it (one may be mid-fork),
    and reap the launcher."""
    deadline = time.monotonic() + 5
    while True:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        launcher.poll()
        if launcher.returncode is not None and not _live_members(launcher.pid):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"sandbox process group {launcher.pid} survived SIGKILL for 5 s")
        time.sleep(0.01)
    launcher.wait()


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run the Python program `source` in the sandbox; return its exit code (None when it ran past
    `limits.wall_seconds`) and the first `limits.output_bytes` of its stdout and stderr. When this returns,
    no live process of the program is left and its working directory is gone."""
    # The base interpreter, isolated (-I): the program sees the standard library only.
    interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    with tempfile.TemporaryDirectory(prefix="wmss-sandbox-") as workdir, \
            tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        launcher = subprocess.Popen(
            [interpreter, "-I", str(_LAUNCHER), json.dumps(asdict(limits))],
            stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=workdir, start_new_session=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir})
        try:
            try:
                launcher.stdin.write(source.encode("utf-8", errors="surrogateescape"))
                launcher.stdin.close()
            except BrokenPipeError:  # the launcher died at once; its stderr says why
                pass
            try:
                returncode = launcher.wait(timeout=limits.wall_seconds + _BACKSTOP_SECONDS)
            except subprocess.TimeoutExpired:
                returncode = None
        finally:
            # Also after a normal exit: in "guards" mode, processes the program left behind share its group.
            _kill_group(launcher)
        err_lines = _read_head(stderr, limits.output_bytes + 256).splitlines(keepends=True)
        markers = [line.strip() for line in err_lines if line.startswith("wmss-sandbox-")]
        isolation = next((m[len(_ISOLATION_MARKER):] for m in markers if m.startswith(_ISOLATION_MARKER)), "unknown")
        if _TIMEOUT_MARKER in markers:
            returncode = None
        err = "".join(line for line in err_lines if not line.startswith("wmss-sandbox-"))
        return SandboxResult(returncode, _read_head(stdout, limits.output_bytes), err[:limits.output_bytes],
                             isolation)
