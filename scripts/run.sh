#!/usr/bin/env bash
# The main job. Until the trainer lands this runs the library's self-check on small random inputs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python -m pdfkernels.selfcheck "$@"
