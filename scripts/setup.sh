#!/usr/bin/env bash
# Create or reuse .venv and install pdfkernels with its dev tools. Sourced by run.sh and test.sh.
# A torch already visible (system site-packages, e.g. a GPU image) is kept; otherwise torch==2.13.0 is
# installed first, so that nothing pulls an unpinned torch with gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
VENV_PY=.venv/bin/python
if ! "$VENV_PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0"
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
stamp=.venv/.pdfkernels-installed
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing pdfkernels and its dependencies"
    torch_pin="torch==$("$VENV_PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
    echo "$torch_pin" > .venv/constraints.txt
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check -c .venv/constraints.txt -e ".[dev]"
    echo "$want" > "$stamp"
fi
