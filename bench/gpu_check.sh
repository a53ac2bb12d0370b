#!/usr/bin/env bash
# GPU validation in one go (for the lent H100/H200): install without dependencies, run the CUDA tests and
# python -m pdfkernels.bench, and leave logs, the markdown tables and the JSON in one folder
# (bench/results/<gpu>-<date>/, or under $OUT).
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))' 2>/dev/null || echo no-gpu)"
DEST="${OUT:-bench/results}/${gpu}-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$DEST"
"$PY" -m pip install --no-deps --no-build-isolation -e . > "$DEST/install.log" 2>&1
nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1
"$PY" - > "$DEST/versions.json" <<'PYEOF'
import json, subprocess, torch, triton, transformers
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "cuda": torch.version.cuda, "commit": commit}, indent=1))
PYEOF
status=0
"$PY" -m pytest tests -q -m gpu > "$DEST/gpu-tests.log" 2>&1 || status=1
"$PY" -m pytest tests -q -m "not gpu" --deselect tests/test_aot.py > "$DEST/kernel-tests-on-cuda.log" 2>&1 || status=1
# the autotuner's choice per launch key (descriptor vs pointer kernels) goes to the logs
export PDFKERNELS_AUTOTUNE_LOG=1
"$PY" -m pdfkernels.bench --out "$DEST" > "$DEST/bench.md" 2>&1 || status=1
# the same attention timings with the pointer kernels only and with autotuning off: TMA's share, side by side
PDFKERNELS_TMA=0 "$PY" -m pdfkernels.bench --only prefix_attention --out "$DEST/tma-off" > "$DEST/bench-tma-off.md" 2>&1 || status=1
PDFKERNELS_AUTOTUNE=0 "$PY" -m pdfkernels.bench --only prefix_attention --out "$DEST/autotune-off" \
    > "$DEST/bench-autotune-off.md" 2>&1 || status=1
tail -n 3 "$DEST"/*.log "$DEST/bench.md"
echo "results in $DEST (status $status)"
exit $status
