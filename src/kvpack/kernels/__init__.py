"""Attention kernels over packed KV blocks: the torch reference (reference.py), the C++ CPU path (cpu.py),
Triton GPU kernels (triton_*.py, importable without triton). `layout.py` says what they read."""
