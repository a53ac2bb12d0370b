#!/usr/bin/env bash
# The oldest supported transformers, 4.52.3 (VLM2Vec's pin), in its own .venv-tf452: install this project
# beside it as a VLM2Vec user would (with dependencies), check that transformers stayed 4.52.3, then run the
# model tests (Hugging Face classes and doubles of VLM2Vec's vendored models), the trainer tests (its collators
# build what 4.52's models take), the export -> stock loader and embed tests, and the ops' self-check.
# One thread: the models are tiny, and on a shared CPU torch's thread pool only adds waiting.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-tf452
PIN="transformers==4.52.3"
start=$SECONDS
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
echo "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$VENV/constraints.txt"
pip_install -c "$VENV/constraints.txt" "$PIN"
pip_install -c "$VENV/constraints.txt" -e ".[dev]"
got="$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
if [ "$got" != "${PIN#transformers==}" ]; then
    echo "[compat-tf452] installing pdfkernels replaced $PIN with transformers $got" >&2
    exit 1
fi
echo "[compat-tf452] transformers $got kept after installing pdfkernels ($((SECONDS - start)) s)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$VENV/bin/python" -m pytest tests/models tests/train tests/test_export.py tests/test_embed.py -q -p no:cacheprovider "$@"
"$VENV/bin/python" -m pdfkernels.selfcheck
echo "[compat-tf452] done in $((SECONDS - start)) s"
