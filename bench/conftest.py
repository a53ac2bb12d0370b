"""Benchmarks run on real kernels: never the interpreter."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("bench/: unset TRITON_INTERPRET; benchmarks time compiled kernels or the PyTorch path")
