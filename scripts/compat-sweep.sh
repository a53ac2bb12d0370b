#!/usr/bin/env bash
# tests/models on several transformers releases in turn, in one .venv-sweep (not part of CI; CI runs the
# oldest supported, 4.52.3, and the newest). Usage: bash scripts/compat-sweep.sh 4.53.3 4.57.6 5.0.0 5.17.0
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-sweep
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
echo "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$VENV/constraints.txt"
pip_install -c "$VENV/constraints.txt" -e ".[dev]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for version in "$@"; do
    pip_install -c "$VENV/constraints.txt" "transformers==$version"
    echo "[compat-sweep] transformers $version: $("$VENV/bin/python" -m pytest tests/models -q -p no:cacheprovider 2>&1 | tail -1)"
done
