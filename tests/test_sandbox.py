"""The code sandbox contains what generated code may do wrong or on purpose (read the driver's secrets, open
sockets, fork and leave processes behind, write outside its folder, look at the host's processes, exit
before its tests run, loop, flood output): each such run fails and leaves the host as it was. The boundary
is never root: as root (CI) the sandbox starts bubblewrap as `nobody`, which these tests check through a
file only root may read."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from wmss.errors import ConfigError
from wmss.evaluation import sandbox
from wmss.evaluation.grading import grade
from wmss.evaluation.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(wall_seconds=4, cpu_seconds=3)
SECRETS = {"AWS_SECRET_ACCESS_KEY": "wJalrFAKESECRETKEY0123", "RAY_AUTH_TOKEN": "ray-fake-token-4567",
           "MLFLOW_TRACKING_PASSWORD": "mlflow-fake-password-89"}


def _alive(name: str) -> list[str]:
    """Live processes of any user whose name is `name` (a zombie holds nothing)."""
    pids = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


@pytest.fixture
def host_marker(tmp_path):
    """Paths a contained program must not be able to create: in a folder the sandbox's user could write
    (mode 777), in the repository, and in the host's /tmp."""
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    paths = [open_folder / "escaped.txt", os.path.join(os.getcwd(), f"escape-{uuid.uuid4().hex}.txt"),
             f"/tmp/wmss-sandbox-escape-{uuid.uuid4().hex}"]
    yield [str(p) for p in paths]
    for path in paths:
        assert not os.path.exists(path), f"the sandboxed program wrote {path} on the host"


def test_a_correct_program_passes_and_its_output_comes_back_without_the_nonce():
    result = run_python("import math\nprint(math.factorial(5))\nimport sys\nprint('err', file=sys.stderr)")
    assert result.passed and result.completed and not result.timed_out
    assert result.stdout == "120\n"
    assert result.stderr.strip().endswith("err")
    assert result.isolation == "bubblewrap"


def test_the_boundary_is_not_root_on_the_host():
    # /etc/shadow is root's (mode 640, group shadow): only a process that is root on the host reads it.
    if not os.path.exists("/etc/shadow") or os.stat("/etc/shadow").st_mode & 0o004:
        pytest.skip("needs a /etc/shadow that others may not read")
    result = run_python("print(len(open('/etc/shadow').read()))", FAST)
    assert not result.passed and "PermissionError" in result.stderr


def test_failures_are_failures():
    assert run_python("assert 1 == 2").returncode == 1
    assert run_python("raise SystemExit(3)").returncode == 3
    assert run_python("def broken(:\n    pass").returncode == 1


@pytest.mark.parametrize("early_exit", [
    "import sys\nsys.exit(0)",
    "import sys\nsys.exit()",
    "raise SystemExit",
    "import os\nos._exit(0)",
    "import posix\nposix._exit(0)",
    "if __name__ == '__main__':\n    import sys\n    sys.exit(0)",
    "print('0123456789abcdef0123456789abcdef')\nimport os\nos._exit(0)",  # a guessed nonce
])
def test_exiting_before_the_tests_fails(early_exit):
    program = f"def add(a, b):\n    return a - b\n{early_exit}\n"
    result = run_python(program + "assert add(2, 3) == 5\n")
    assert result.returncode == 0 and not result.completed and not result.passed
    graded = grade(f"```python\n{program}```", "assert add(2, 3) == 5\n", "mbpp")
    assert not graded.correct


def test_the_nonce_is_not_in_the_program_s_reach(monkeypatch):
    nonce = uuid.uuid4().hex
    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda _n: nonce)
    source = ("import os, sys\nprint(sys.argv, dict(os.environ), list(globals()))\n"
              "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
              "    for what in ('cmdline', 'environ'):\n"
              "        try:\n"
              "            print(open(f'/proc/{pid}/{what}', 'rb').read())\n"
              "        except OSError:\n"
              "            pass\n")
    result = run_python(source)
    assert result.passed and nonce not in result.stdout


def test_the_driver_s_secrets_are_unreadable(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    source = ("import os\nprint(dict(os.environ))\n"
              "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
              "    for what in ('environ', 'cmdline'):\n"
              "        try:\n"
              "            print(pid, what, open(f'/proc/{pid}/{what}', 'rb').read())\n"
              "        except OSError as e:\n"
              "            print(pid, what, e)\n")
    result = run_python(source, FAST)
    assert result.passed, result.stderr
    for value in SECRETS.values():
        assert value not in result.stdout
    assert "AWS_" not in result.stdout and "RAY_" not in result.stdout and "MLFLOW" not in result.stdout


def test_host_processes_are_invisible():
    source = ("import os\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
              "print(pids)\nprint(b' '.join(open(f'/proc/{p}/cmdline', 'rb').read() for p in pids))")
    result = run_python(source, FAST)
    assert result.passed, result.stderr
    pids = eval(result.stdout.splitlines()[0])
    assert len(pids) <= 4 and max(pids) <= 4  # bwrap's init, the launcher, the program (and /proc/self)
    assert b"pytest" not in result.stdout.encode() and str(os.getpid()) not in result.stdout.splitlines()[0]


@pytest.mark.parametrize("connect", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'hi')",
    # SocketType is the class itself: a guard that replaces socket.socket and _socket.socket misses it.
    "import _socket\ns = _socket.SocketType(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\n"
    "s.connect(('127.0.0.1', {port}))\ns.send(b'hi')",
    "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\n"
    "s.connect(('1.1.1.1', 53))",
])
def test_sockets_cannot_reach_the_host_or_the_network(connect):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    try:
        result = run_python(connect.format(port=server.getsockname()[1]), FAST)
        assert not result.passed and "Error" in result.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_a_fork_bomb_through_posix_fork_is_limited_and_leaves_no_process():
    name = f"fb{uuid.uuid4().hex[:12]}"
    source = ("import ctypes, posix, time\nlibc = ctypes.CDLL(None)\nn = 0\ntry:\n    while True:\n"
              f"        if posix.fork() == 0:\n            libc.prctl(15, b'{name}', 0, 0, 0)\n"
              "            time.sleep(60)\n            posix._exit(0)\n        n += 1\n"
              "except OSError as e:\n    print(n, e.errno)\n")
    result = run_python(source, FAST)
    forked, errno = map(int, result.stdout.split())
    assert forked < FAST.processes and errno == 11  # EAGAIN: the process limit, not the clock
    assert _alive(name) == []


def test_a_setsid_child_does_not_survive_the_run():
    name = f"ss{uuid.uuid4().hex[:12]}"
    source = ("import ctypes, os, posix, time\nlibc = ctypes.CDLL(None)\n"
              f"if posix.fork() == 0:\n    os.setsid()\n    libc.prctl(15, b'{name}', 0, 0, 0)\n"
              "    time.sleep(60)\n    posix._exit(0)\n"
              "time.sleep(0.5)\nprint('parent done')")
    result = run_python(source, FAST)
    assert result.passed and result.stdout == "parent done\n"
    assert _alive(name) == []


def test_a_process_left_by_a_timed_out_run_is_killed():
    name = f"to{uuid.uuid4().hex[:12]}"
    source = ("import ctypes, os, posix, time\nlibc = ctypes.CDLL(None)\n"
              f"if posix.fork() == 0:\n    os.setsid()\n    libc.prctl(15, b'{name}', 0, 0, 0)\n"
              "time.sleep(60)\n")
    result = run_python(source, SandboxLimits(wall_seconds=1.5))
    assert result.timed_out and not result.passed
    assert _alive(name) == []


def test_writing_outside_the_scratch_folder_fails(host_marker):
    *host_folders, host_tmp = host_marker
    for path in host_folders:
        result = run_python(f"open({path!r}, 'w').write('x')", FAST)
        assert not result.passed and "Error" in result.stderr
    # The sandbox's /tmp is its own tmpfs: the write succeeds there and never reaches the host's /tmp.
    assert run_python(f"open({host_tmp!r}, 'w').write('x')", FAST).passed
    assert run_python("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())",
                      FAST).stdout == "ok\n"


def test_each_run_gets_a_fresh_scratch_folder():
    first = run_python("open('left.txt', 'w').write('x')", FAST)
    second = run_python("import os\nprint(sorted(os.listdir('.')))", FAST)
    assert first.passed and second.passed
    assert second.stdout == "[]\n"


def test_an_infinite_loop_is_killed():
    start = time.monotonic()
    result = run_python("while True:\n    pass", FAST)
    assert not result.passed
    assert time.monotonic() - start < FAST.wall_seconds + 6


def test_sleeping_past_the_wall_clock_times_out():
    result = run_python("import time\ntime.sleep(60)", SandboxLimits(wall_seconds=1.5))
    assert result.timed_out and not result.passed


def test_huge_output_is_cut_and_fails():
    limits = SandboxLimits(wall_seconds=10, cpu_seconds=8, file_bytes=1 << 20, output_bytes=1000)
    result = run_python("while True:\n    print('x' * 10000)", limits)
    assert not result.passed and not result.timed_out  # stopped by the file-size limit, not the clock
    assert len(result.stdout) == 1000


def test_output_longer_than_what_comes_back_still_passes():
    result = run_python("print('y' * 5000)", SandboxLimits(output_bytes=1000))
    assert result.passed and result.stdout == "y" * 1000


def test_spawning_processes_is_refused_at_the_python_level():
    result = run_python("import os\nos.system('true')", FAST)
    assert not result.passed and "PermissionError" in result.stderr
    assert not run_python("import subprocess\nsubprocess.run(['true'])", FAST).passed


def test_memory_limit():
    result = run_python("x = bytearray(2 << 30)", SandboxLimits(memory_bytes=512 << 20))
    assert not result.passed and "MemoryError" in result.stderr


def test_without_bubblewrap_code_evaluation_refuses_unless_opted_in(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "BWRAP_PATH", str(tmp_path / "no-bwrap"))
    monkeypatch.delenv(sandbox.ALLOW_UNSANDBOXED_ENV, raising=False)
    with pytest.raises(ConfigError, match="apt-get install bubblewrap") as refused:
        run_python("print(1)")
    assert sandbox.ALLOW_UNSANDBOXED_ENV in str(refused.value)
    with pytest.raises(ConfigError):
        grade("```python\ndef add(a, b):\n    return a + b\n```", "assert add(2, 3) == 5\n", "mbpp")
    monkeypatch.setenv(sandbox.ALLOW_UNSANDBOXED_ENV, "1")
    result = run_python("print(6 * 7)", FAST)
    assert result.passed and result.stdout == "42\n" and result.isolation == "none"
    assert not run_python("import sys\nsys.exit(0)", FAST).passed  # the nonce rule holds here too


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists(sandbox.SYSTEM_PYTHON),
                    reason="needs root, setpriv and a system python3 to become a plain user")
def test_a_non_root_caller_gets_the_same_boundary(monkeypatch):
    """The cluster's case: the driver runs as a plain user (uid 1000 there, `nobody` here), and its own
    folders (run directories, checkpoints) are what an escape would write to."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["AWS_SECRET_ACCESS_KEY"])
    home = tempfile.mkdtemp(prefix="wmss-sandbox-user-")
    try:
        os.chmod(home, 0o755)
        owned = os.path.join(home, "runs")
        os.mkdir(owned)
        os.chown(owned, sandbox.NOBODY, sandbox.NOBODY)
        script = os.path.join(home, "check.py")
        with open(script, "w") as f:
            escape = f"open({os.path.join(owned, 'escaped')!r}, 'w')"
            environ = "import glob\nprint([open(p, 'rb').read() for p in glob.glob('/proc/*/environ')])"
            f.write(f"import os\nfrom wmss.evaluation.sandbox import run_python\nwrite = run_python({escape!r})\n"
                    f"env = run_python({environ!r})\nprint(os.getuid(), write.isolation, write.passed, env.passed, "
                    "os.environ['AWS_SECRET_ACCESS_KEY'] in env.stdout)\n")
        out = subprocess.run(["setpriv", f"--reuid={sandbox.NOBODY}", f"--regid={sandbox.NOBODY}", "--clear-groups",
                              sandbox.SYSTEM_PYTHON, script], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(Path(sandbox.__file__).parents[2])})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(sandbox.NOBODY), "bubblewrap", "False", "True", "False"]
        assert os.listdir(owned) == []
    finally:
        shutil.rmtree(home)


def test_where_user_namespaces_are_forbidden_code_evaluation_refuses(monkeypatch):
    # A bwrap that fails as a kernel or container profile without user namespaces makes it fail.
    folder = tempfile.mkdtemp(prefix="wmss-sandbox-bwrap-")
    try:
        os.chmod(folder, 0o755)
        fake = os.path.join(folder, "bwrap")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        os.chmod(fake, 0o755)
        monkeypatch.setattr(sandbox, "BWRAP_PATH", fake)
        monkeypatch.delenv(sandbox.ALLOW_UNSANDBOXED_ENV, raising=False)
        with pytest.raises(ConfigError, match="No permissions to create new namespace.*unprivileged user namespaces"):
            run_python("print(1)")
    finally:
        shutil.rmtree(folder)
