"""The code sandbox contains what generated code may do wrong (fork bombs, endless loops, writes outside
its folder, sockets, floods of output, shell calls): each run is scored as a failure and leaves the host
as it was: no file outside the sandbox, no process left."""

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from wmss.evaluation.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(wall_seconds=4, cpu_seconds=3)
NAMESPACES = os.geteuid() == 0  # CI runs as root, where the launcher enters namespaces


def _sandbox_processes() -> list[int]:
    """Live processes of any sandbox: the launcher and whatever it forked share its command line."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"sandbox_launcher.py" in cmdline and state != "Z":
            found.append(int(entry))
    return found


def _processes_of_uid(uid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue
        real_uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        state = next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))
        if int(real_uid) == uid and state != "Z":
            found.append(int(entry))
    return found


@pytest.fixture
def host_marker(tmp_path):
    """Paths a contained program must not be able to create: one in a private host folder, one in /tmp."""
    paths = [tmp_path / "escaped.txt", f"/tmp/wmss-sandbox-escape-{uuid.uuid4().hex}"]
    yield paths
    for path in paths:
        assert not os.path.exists(path), f"the sandboxed program wrote {path} on the host"


def test_a_clean_program_passes_and_its_output_comes_back():
    result = run_python("import math, collections\nprint(math.factorial(5))\nimport sys\nprint('err', file=sys.stderr)")
    assert result.passed and not result.timed_out
    assert result.stdout == "120\n"
    assert result.stderr.strip().endswith("err")
    assert result.isolation == ("namespaces" if NAMESPACES else "guards")


def test_failures_are_failures():
    assert run_python("assert 1 == 2").returncode == 1
    assert run_python("raise SystemExit(3)").returncode == 3
    assert run_python("def broken(:\n    pass").returncode == 1
    assert run_python("import sys; sys.exit()").passed


def test_infinite_loop_is_killed():
    start = time.monotonic()
    result = run_python("while True:\n    pass", FAST)
    assert not result.passed
    assert time.monotonic() - start < FAST.wall_seconds + 6


def test_sleeping_past_the_wall_clock_times_out():
    result = run_python("import time\ntime.sleep(60)", SandboxLimits(wall_seconds=1.5))
    assert result.timed_out and not result.passed


def test_fork_bomb_is_contained_and_leaves_no_process():
    # ctypes calls fork(2) directly, past the Python-level guard, so the kernel limits are what hold it.
    source = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()"
    before = set(_processes_of_uid(65534)) if NAMESPACES else set()
    result = run_python(source, FAST)
    assert not result.passed
    assert _sandbox_processes() == []
    if NAMESPACES:  # the sandbox user has no process left
        assert set(_processes_of_uid(65534)) <= before
    python_bomb = run_python("import os\nwhile True:\n    os.fork()", FAST)
    assert not python_bomb.passed and "PermissionError" in python_bomb.stderr


def test_leftover_background_processes_are_killed():
    name = f"wl{uuid.uuid4().hex[:12]}"
    # The program starts a child that would outlive it (via ctypes, as the guard refuses os.fork) and
    # names it, so it can be looked for from here; the parent waits until the child has its name.
    source = ("import ctypes, time\nlibc = ctypes.CDLL(None)\n"
              f"if libc.fork() == 0:\n    libc.prctl(15, b'{name}', 0, 0, 0)\n    time.sleep(30)\n"
              "time.sleep(0.5)\nprint('parent done')")
    result = run_python(source, FAST)
    assert result.passed and "parent done" in result.stdout
    survivors = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    assert survivors == []
    assert _sandbox_processes() == []


def test_writing_outside_the_working_directory_is_contained(host_marker):
    private, scratch = host_marker
    source = (f"open({str(private)!r}, 'w').write('x')")
    assert not run_python(source, FAST).passed
    # /tmp is world-writable on the host; the sandbox sees a private one, so the write goes nowhere.
    run_python(f"open({scratch!r}, 'w').write('x')", FAST)
    # Inside its own folder the program may write.
    assert run_python("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())", FAST).stdout == "ok\n"


def test_each_run_gets_a_fresh_working_directory():
    first = run_python("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())", FAST)
    second = run_python("import os\nprint(sorted(os.listdir('.')))", FAST)
    assert first.passed and second.passed
    assert second.stdout == "[]\n"
    if not NAMESPACES:  # guards mode: a host temp folder, removed afterwards
        assert not os.path.exists(first.stdout.strip())


def test_sockets_cannot_reach_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'hi')",
                            FAST)
        assert not result.passed
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected
        outside = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)", FAST)
        assert not outside.passed
    finally:
        server.close()


def test_huge_output_is_cut_and_fails():
    limits = SandboxLimits(wall_seconds=10, cpu_seconds=8, file_bytes=1 << 20, output_bytes=1000)
    result = run_python("while True:\n    print('x' * 10000)", limits)
    assert not result.passed and not result.timed_out  # stopped by the file-size limit, not the clock
    assert len(result.stdout) == 1000


def test_os_system_is_refused(host_marker):
    private, _scratch = host_marker
    result = run_python(f"import os\nos.system('touch {private}')", FAST)
    assert not result.passed and "PermissionError" in result.stderr
    result = run_python(f"import subprocess\nsubprocess.run(['touch', '{private}'])", FAST)
    assert not result.passed


def test_memory_limit():
    result = run_python("x = bytearray(2 << 30)", SandboxLimits(memory_bytes=512 << 20))
    assert not result.passed and "MemoryError" in result.stderr


def test_no_process_is_left_behind():
    for source in ("print(1)", "while True:\n    pass", "import time\ntime.sleep(60)"):
        run_python(source, SandboxLimits(wall_seconds=1, cpu_seconds=1))
        assert _sandbox_processes() == []


@pytest.mark.skipif(not NAMESPACES or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run without CAP_SYS_ADMIN")
def test_guards_mode_where_namespaces_are_refused(tmp_path):
    """Without CAP_SYS_ADMIN unshare fails: the launcher says so, refuses sockets and still limits time."""
    script = tmp_path / "guards.py"
    script.write_text(
        "from wmss.evaluation.sandbox import SandboxLimits, run_python\n"
        "limits = SandboxLimits(wall_seconds=2, cpu_seconds=2)\n"
        "ok = run_python('print(6 * 7)', limits)\n"
        "sock = run_python('import socket\\nsocket.socket()', limits)\n"
        "loop = run_python('while True:\\n    pass', limits)\n"
        "print(ok.isolation, ok.stdout.strip(), sock.passed, 'PermissionError' in sock.stderr, loop.passed)\n")
    out = subprocess.run(["setpriv", "--bounding-set=-sys_admin", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["guards", "42", "False", "True", "False"]
