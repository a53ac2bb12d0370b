#!/usr/bin/env bash
# The test suite on the GPU machines' versions (triton 3.6, transformers 5.17) in a separate .venv-compat,
# so that code that must run there unchanged is checked on this CPU. numpy < 2.4: triton 3.6's
# interpreter calls int() on 1-element arrays, which numpy 2.4 refuses.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv-compat/bin/python ] || "$PYTHON" -m venv .venv-compat
.venv-compat/bin/python -c "import torch" 2>/dev/null || .venv-compat/bin/pip install -q "torch==2.13.0"
.venv-compat/bin/pip install -q "triton==3.6.0" "transformers==5.17.0" "numpy<2.4" peft datasets pillow safetensors \
    pyyaml tokenizers pytest pytest-benchmark
PYTHONPATH=. .venv-compat/bin/python -m pytest tests -q -p no:cacheprovider "$@"
