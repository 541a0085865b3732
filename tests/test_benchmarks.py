"""The GPU check script (benchmarks/gpu_checks.py) at toy size on CPU, so the script a lent GPU session runs
in one go has run before: its checks compare the fused paths with the plain references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_checks_run_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_checks.py", "--small", "--device", "cpu", "--repeats", "1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert results["checks"] and all(results["checks"].values())
    # two implementations' gradients (float32, other summation orders), not one tensor compared with itself
    assert 0 < results["mixed_ce"]["grad_rel_err"] < 1e-4
    assert results["scoring"]["max_abs_diff"] < 1e-3 and results["jtws_step"]["step_s"] > 0
    assert "checks:" in done.stdout
