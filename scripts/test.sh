#!/usr/bin/env bash
# The tests: lint, the CPU test suite (GPU tests skip without CUDA), and the ahead-of-time compile check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest tests -q "$@"
TRITON_INTERPRET=0 .venv/bin/python -m pdfkernels.aot
