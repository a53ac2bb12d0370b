#!/usr/bin/env bash
# The tests: lint, the CPU test suite (GPU tests skip without CUDA; tests/test_aot.py runs the ahead-of-time
# compile of every registered configuration and the static profile), and the compatibility run on
# transformers 4.52.3 in .venv-tf452.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
# the test models are tiny: a second intra-op thread gains nothing and, on a shared CPU, costs waiting
# (a 64x128 Linear took 16 ms with 2 threads on a busy 2-core machine, 0.06 ms with 1)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check .
.venv/bin/python -m pytest tests -q "$@"
bash scripts/compat-tf452.sh  # transformers 4.52.3 (VLM2Vec's pin): the model and trainer tests, the ops' self-check
