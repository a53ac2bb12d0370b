#!/usr/bin/env bash
# The tests: lint, the CPU test suite (GPU tests skip without CUDA; tests/test_aot.py runs the ahead-of-time
# compile of every registered configuration and the static profile), and the compatibility run on
# transformers 4.52.3 in .venv-tf452.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
# optional, for the tests only (the main job does not need it): DeepSpeed, for the VLM2Vec trainer's ZeRO tests on
# its CPU accelerator (they skip without it); pure Python, its ops built only when used, torch held by the constraints
if ! .venv/bin/python -c "import deepspeed" >/dev/null 2>&1; then
    DS_BUILD_OPS=0 .venv/bin/python -m pip install --quiet --disable-pip-version-check -c .venv/constraints.txt \
        deepspeed >/dev/null 2>&1 || echo "[test] deepspeed did not install: its tests will skip"
fi
# the test models are tiny: a second intra-op thread gains nothing and, on a shared CPU, costs waiting
# (a 64x128 Linear took 16 ms with 2 threads on a busy 2-core machine, 0.06 ms with 1)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check .
.venv/bin/python -m pytest tests -q "$@"
bash scripts/compat-tf452.sh  # transformers 4.52.3 (VLM2Vec's pin): the model and trainer tests, the ops' self-check
