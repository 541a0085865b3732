#!/usr/bin/env bash
# Packs into .gpu/site what benchmarks/gpu_checks.py needs on the lent GPU machine beyond what that machine
# has (torch, transformers, accelerate, pyarrow, numpy, pyyaml, ninja, psutil, py-cpuinfo, msgpack): DeepSpeed
# (copied from .venv: pure Python, its CUDA ops are JIT-built there with the machine's nvcc), and wheels
# for its Python (3.12) of pydantic, pydantic-core, annotated-types, typing-inspection, hjson and
# cut-cross-entropy, unpacked. Versions are this checkout's. Then, through the device tool:
#   run(command="PYTHONUNBUFFERED=1 PYTHONPATH=.gpu/site:. python3 benchmarks/gpu_checks.py --out $OUT/gpu.json",
#       carry=[".gpu"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
site=.gpu/site
rm -rf .gpu && mkdir -p "$site" .gpu/wheels
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
    "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
    "typing-inspection==$(version typing-inspection)" "hjson==$(version hjson)" "cut-cross-entropy==$(version cut-cross-entropy)"
for wheel in .gpu/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$site"; done
rm -rf .gpu/wheels
deepspeed=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('deepspeed').origin))")
cp -r "$deepspeed" "$site/deepspeed"
find "$site" -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu
