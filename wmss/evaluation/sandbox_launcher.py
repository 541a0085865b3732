"""The process that `wmss.evaluation.sandbox.run_python` starts (run as `python -I sandbox_launcher.py
LIMITS_JSON`, program source on stdin). Standard library only: it runs in an isolated interpreter.

As root it enters new network, PID, mount and IPC namespaces, puts fresh tmpfs over the world-writable
folders, works in a fresh folder on that tmpfs and drops to the `nobody` user (root is exempt from the
process-count limit and owns the host's files). Elsewhere (not root, or unshare refused) the program
shares the host's network and filesystem, with Python's sockets refused. Either way it runs in a forked
child with resource limits and with process-spawning calls disabled, and the stderr line
`wmss-sandbox-isolation=...` names the isolation in force."""

import ctypes
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 2, 4, 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
NOBODY = 65534
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable on a typical Linux host

libc = ctypes.CDLL(None, use_errno=True)


def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), f"mount {target}")


def first_unsearchable_folder(path):
    """The first folder on the way to `path` that other users may not enter, or None."""
    parts = os.path.abspath(path).split("/")[1:]
    for i in range(1, len(parts) + 1):
        folder = "/" + "/".join(parts[:i])
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def enter_namespaces():
    """Isolate network, processes, mounts and IPC, move into a fresh working folder and become `nobody`.
    The namespaces go away with their last process, so nothing here needs undoing on the host."""
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # keep every mount below out of the host's view
    prefix = os.path.realpath(sys.base_prefix)
    blocked = first_unsearchable_folder(prefix)
    if blocked is not None:
        # The interpreter lives under a folder `nobody` may not enter (e.g. /root/.pyenv): cover that folder
        # with an empty tmpfs and show only the interpreter's prefix inside it, at the same path.
        staging = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        mount(prefix, staging, None, MS_BIND | MS_REC)
        mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        os.makedirs(prefix, exist_ok=True)
        mount(staging, prefix, None, MS_MOVE)
    for folder in SCRATCH_DIRS:
        if os.path.isdir(folder):
            mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    os.chown(workdir, NOBODY, NOBODY)
    os.chdir(workdir)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def refuse(*_args, **_kwargs):
    raise PermissionError("disabled in the wmss sandbox")


def install_guards(block_sockets):
    """Python-level defence in depth: generated code has no business starting processes; without a network
    namespace, sockets are refused too. (ctypes can bypass these; the kernel limits still hold.)"""
    import subprocess

    for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "kill", "killpg"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    subprocess.Popen = refuse
    if block_sockets:
        import _socket
        import socket

        for module in (socket, _socket):
            for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
                if hasattr(module, name):
                    setattr(module, name, refuse)


def set_limits(limits):
    for name, value in (("RLIMIT_CPU", limits["cpu_seconds"]), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NPROC", limits["processes"]),
                        ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def run_program(source, limits, block_sockets):
    """The forked child: die with the launcher, limit itself, guard, run the program; never returns."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    code = 0
    try:
        set_limits(limits)
        install_guards(block_sockets)
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # output over the file-size limit
        code = code or 1
    os._exit(code)


def main():
    limits = json.loads(sys.argv[1])
    source = sys.stdin.read()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    isolation = "guards"
    if os.geteuid() == 0:
        try:
            enter_namespaces()
            isolation = "namespaces"
        except OSError as e:
            print(f"wmss sandbox: namespaces unavailable ({e}); using guards", file=sys.stderr)
    print(f"wmss-sandbox-isolation={isolation}", file=sys.stderr, flush=True)
    pid = os.fork()  # in a new PID namespace the child is its init: when it exits, the kernel kills the rest
    if pid == 0:
        run_program(source, limits, block_sockets=isolation != "namespaces")

    def on_wall_timeout(_signum, _frame):
        print("wmss-sandbox-timeout", file=sys.stderr, flush=True)
        os.kill(pid, signal.SIGKILL)

    # The wall clock is enforced here, not only by the host, so that this process reaps the killed child:
    # an orphaned namespace init would wait as a zombie for the host's init to collect it.
    signal.signal(signal.SIGALRM, on_wall_timeout)
    signal.setitimer(signal.ITIMER_REAL, limits["wall_seconds"])
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    main()
