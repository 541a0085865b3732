"""wmss: Weak-Driven Learning (WMSS) on Ray — SFT, entropy-driven data activation, joint weak/strong training."""

import glob as _glob
import os as _os

__version__ = "0.1.0"

# transformers imports DeepSpeed (through accelerate) whenever it saves a model; on a machine without an
# NVIDIA GPU, DeepSpeed would then print its CPU-fallback warning on stdout, in the middle of command output.
if not _glob.glob("/dev/nvidia[0-9]*"):
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")
