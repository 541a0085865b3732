"""One driver per run directory: the lock `open_workflow` (and `wmss stage reset`) takes before touching it.

A local or shared-filesystem run directory (NFS, Lustre, a laptop's disk) holds `driver.lock`, created with
O_EXCL, which names its holder (host, pid, start time) and carries a heartbeat the holder's thread rewrites
every HEARTBEAT_S seconds. An object-store run directory has no exclusive create that every store offers, so
its lock is the `driver` entry of the manifest itself, claimed and refreshed by the manifest's conditional
write (wmss.storage.RunStore.write_if): of two drivers that read the same manifest, one write fails.

A lock whose holder is gone may be taken over, and the taker says so: a process of this host that no longer
runs (killed, crashed), or a heartbeat older than EXPIRES_S (a machine that died, a driver that hangs).
Otherwise the second driver gets RunDirLocked naming the holder. A driver that finds its lock taken over
(it hung past EXPIRES_S) stops at its next manifest write with LockLost. The lock is released when the
driver's process ends (also on an error, Ctrl-C or SIGTERM); a SIGKILLed driver leaves a lock of a dead pid.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from wmss.errors import WmssError
from wmss.io import atomic_path

HEARTBEAT_S = 30.0  # how often a holder refreshes its lock
EXPIRES_S = 300.0  # a lock not refreshed for this long is abandoned
LOCK_FILE = "driver.lock"


class RunDirLocked(WmssError):
    """Another driver holds the run directory."""


class LockLost(WmssError):
    """This driver's lock was taken over by another driver (this one stopped refreshing it for too long)."""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot; Linux), to tell a reused pid from its first owner."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _running(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":  # killed, not yet reaped
            return False
    except OSError:
        pass
    return start is None or _start_ticks(pid) in (None, start)


@dataclass
class Holder:
    """Who holds a lock, as the lock file or the manifest's `driver` entry records it."""

    host: str
    pid: int
    since: float  # time.time() when it took the lock
    heartbeat: float  # time.time() of its last refresh
    token: str  # tells this holding apart from an earlier one of the same process
    start: int | None = None  # the process's start time (_start_ticks)

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex, _start_ticks(os.getpid()))

    @classmethod
    def parse(cls, data) -> Holder | None:
        try:
            return cls(**data)
        except TypeError:
            return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return (f"host {self.host}, pid {self.pid}, since {since} (last heartbeat "
                f"{max(0.0, time.time() - self.heartbeat):.0f} s ago)")

    def abandoned(self) -> str | None:
        """Why the lock may be taken over; None while its holder may still be at work."""
        if self.host == socket.gethostname():
            if self.pid == os.getpid():
                return "an earlier driver of this process"
            if not _running(self.pid, self.start):
                return f"its process {self.pid} no longer runs"
        age = time.time() - self.heartbeat
        return f"its heartbeat is {age:.0f} s old (over {EXPIRES_S:.0f} s)" if age > EXPIRES_S else None


def locked_error(run_dir, holder: Holder | None) -> RunDirLocked:
    """The error for a run directory that `holder` (None: a driver that left no name) holds."""
    if holder is None:
        return RunDirLocked(f"{run_dir}: another driver wrote its manifest since this one read it; one driver "
                            "per run directory")
    return RunDirLocked(f"{run_dir}: another driver is using this run directory ({holder.describe()}); wait for "
                        f"it to end or stop it. A lock whose process is gone, or whose heartbeat is over "
                        f"{EXPIRES_S:.0f} s old, is taken over by the next driver.")


def _say_takeover(run_dir, holder: Holder, reason: str) -> None:
    if reason != "an earlier driver of this process":
        print(f"[wmss] {run_dir}: taking over the lock of {holder.describe()}: {reason}", flush=True)


class _FileLock:
    """`driver.lock` in a local or shared-filesystem run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.me = run_dir, run_dir / LOCK_FILE, Holder.me()

    def _read(self) -> Holder | None:
        try:
            return Holder.parse(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        for attempt in range(50):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written by its creator (or left empty by a crash): look again
                    try:
                        age = time.time() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if attempt < 20 or age < EXPIRES_S:
                        time.sleep(0.1)
                        continue
                    holder = Holder("?", -1, 0.0, 0.0, "")
                reason = holder.abandoned()
                if reason is None:
                    raise locked_error(self.run_dir, holder) from None
                self._break(holder, reason)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(self.me)))
            return
        raise RunDirLocked(f"{self.path}: could not take the lock: other drivers keep taking it")

    def _break(self, holder: Holder, reason: str) -> None:
        """Remove the abandoned lock of `holder`, unless another taker removed it first."""
        mutex = self.path.with_name(f"{LOCK_FILE}.takeover")
        try:
            os.close(os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - mutex.stat().st_mtime > 60:  # a taker that died within these few lines
                    mutex.unlink(missing_ok=True)
            time.sleep(0.1)
            return
        try:
            current = self._read()
            if current is not None and current.token == holder.token or current is None and holder.pid == -1:
                _say_takeover(self.run_dir, holder, reason)
                self.path.unlink(missing_ok=True)
        finally:
            mutex.unlink(missing_ok=True)

    def refresh(self) -> None:
        self.check()
        self.me.heartbeat = time.time()
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(asdict(self.me)))

    def check(self) -> None:
        current = self._read()
        if current is None or current.token != self.me.token:
            held = f" ({current.describe()})" if current is not None else ""
            raise LockLost(f"{self.run_dir}: this driver's lock was taken over by another driver{held}; stopping "
                           "before it writes the manifest")

    def release(self) -> None:
        current = self._read()
        if current is not None and current.token == self.me.token:
            self.path.unlink(missing_ok=True)


class _ManifestLock:
    """The `driver` entry of an object-store run directory's manifest (wmss.workflow.Manifest, whose save is a
    conditional write that raises RunDirLocked when another driver wrote the manifest since)."""

    def __init__(self, manifest):
        self.manifest, self.me = manifest, Holder.me()

    def acquire(self) -> None:
        with self.manifest.mutex:
            holder = Holder.parse(self.manifest.data.get("driver") or {})
            if holder is not None:
                reason = holder.abandoned()
                if reason is None:
                    raise locked_error(self.manifest.store, holder)
                _say_takeover(self.manifest.store, holder, reason)
            self.manifest.data["driver"] = asdict(self.me)
            self.manifest.save()

    def refresh(self) -> None:
        with self.manifest.mutex:
            self.me.heartbeat = time.time()
            self.manifest.data["driver"] = asdict(self.me)
            self.manifest.save()

    def check(self) -> None:
        """Nothing to read: the manifest's conditional write is the check."""

    def release(self) -> None:
        with self.manifest.mutex:
            self.manifest.data.pop("driver", None)
            self.manifest.save()


class DriverLock:
    """A held run-directory lock: a daemon thread refreshes it every HEARTBEAT_S; `release` (run at the
    process's exit if not before) stops the thread and gives the lock up."""

    def __init__(self, backend):
        self.backend, self.stop = backend, threading.Event()
        backend.acquire()
        self.thread = threading.Thread(target=self._beat, name="wmss-run-dir-lock", daemon=True)
        self.thread.start()
        atexit.register(self.release)
        _exit_on_sigterm()

    def _beat(self) -> None:
        failing = False
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.backend.refresh()
                failing = False
            except WmssError as err:  # taken over: the main thread meets it at its next manifest write
                print(f"[wmss] run directory lock: {err}", flush=True)
                return
            except Exception as err:  # noqa: BLE001  (a full disk, a store that is away: tried again next beat)
                if not failing:
                    print(f"[wmss] run directory lock: cannot refresh its heartbeat ({err}); trying again every "
                          f"{HEARTBEAT_S:.0f} s", flush=True)
                failing = True

    def check(self) -> None:
        """Raise LockLost when another driver took the lock over."""
        self.backend.check()

    def release(self) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        atexit.unregister(self.release)
        if self.thread is not threading.current_thread():
            self.thread.join()
        try:
            self.backend.release()
        except WmssError:  # taken over meanwhile: it is not ours to remove
            pass


def _exit_on_sigterm() -> None:
    """Make SIGTERM (`wmss jobs stop`, a pod's shutdown) end the driver as Ctrl-C does, unwinding, so its
    lock is released at exit, unless someone else already handles SIGTERM."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def lock_run_dir(store, manifest) -> DriverLock:
    """Take the lock of the run directory `store` (a wmss.storage.RunStore): its lock file, or for an
    object-store run directory the `driver` entry of its `manifest`. RunDirLocked names the holder when
    another driver has it."""
    return DriverLock(_ManifestLock(manifest) if store.uri is not None else _FileLock(store.local))
