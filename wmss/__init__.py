"""wmss: Weak-Driven Learning (WMSS) on Ray — SFT, entropy-driven data activation, joint weak/strong training."""

__version__ = "0.1.0"
