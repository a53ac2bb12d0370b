#!/usr/bin/env bash
# The tests: lint, the CPU test suite (GPU tests skip without CUDA), the ahead-of-time compile check, and the
# compatibility run on transformers 4.52.3 in .venv-tf452.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest tests -q "$@"
TRITON_INTERPRET=0 .venv/bin/python -m pdfkernels.aot
bash scripts/compat-tf452.sh  # transformers 4.52.3 (VLM2Vec's pin): the model tests and the ops' self-check
