#!/usr/bin/env bash
# GPU validation in one go for the lent H100/H200, staged to finish within GPU_CHECK_BUDGET_S (default 470 s, under
# 8 minutes): install without dependencies, then the two headline ratios first (prefix attention fwd+bwd at 2k
# tokens against the fastest peer; PDF's train step against the plain one), the CUDA tests, the full benchmarks, the
# attention timings without TMA and without autotuning, and every kernel test on CUDA tensors while time remains.
# Each stage gets min(its limit, the time left); one that would get under 15 s is skipped and says so. Logs, the
# markdown tables and the JSON (written after every part, so a stage cut short keeps its finished parts) go to one
# folder: bench/results/<gpu>-<date>/, or under $OUT.
#   bash bench/gpu_check.sh             # on the GPU machine
#   bash bench/gpu_check.sh --cpu       # rehearsal on a CPU: the same stages CPU-sized (--quick), no install
#   bash bench/gpu_check.sh --dry-run   # print the stages, their limits and commands; run nothing
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
MODE=gpu
case "${1:-}" in
    --cpu) MODE=cpu ;;
    --dry-run) MODE=dry ;;
    "") ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --cpu, --dry-run or nothing)" >&2; exit 2 ;;
esac
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
QUICK=()
HEADLINE_SELECT="prefix_attention=L2048 and fwd+bwd"
if [ "$MODE" = cpu ]; then
    QUICK=(--quick)
    HEADLINE_SELECT="prefix_attention=fwd+bwd"  # the CPU sizes have no 2k sequences; the headline says which it used
    BUDGET="${GPU_CHECK_BUDGET_S:-900}"
fi
if [ "$MODE" = dry ]; then
    gpu=dry-run
else
    gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))' 2>/dev/null || echo cpu)"
fi
DEST="${OUT:-bench/results}/${gpu}-$(date -u +%Y%m%d-%H%M%S)"
[ "$MODE" = dry ] || mkdir -p "$DEST"
START=$(date +%s)
status=0

# stage NAME LIMIT LOG COMMAND...: run COMMAND with its output in $DEST/LOG, cut at min(LIMIT, time left)
stage() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local left=$((BUDGET - ($(date +%s) - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$MODE" = dry ]; then  # worst case: every stage runs to its limit
        echo "stage $name: limit ${limit}s, log $log: $*"
        START=$((START - limit))
        return 0
    fi
    if [ "$limit" -lt 15 ]; then
        echo "stage $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$DEST/stages.txt"
        return 0
    fi
    local t0=$(date +%s)
    timeout -s INT -k 10 "$limit" "$@" > "$DEST/$log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && status=1
    local why=""
    [ "$rc" -eq 124 ] && why=" (cut at ${limit}s)"
    echo "stage $name: exit $rc in $(($(date +%s) - t0))s$why, log $log" >> "$DEST/stages.txt"
}

if [ "$MODE" != cpu ]; then
    stage install 45 install.log "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
[ "$MODE" = gpu ] && nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1
stage versions 20 versions.json "$PY" -c 'import json, subprocess, torch, triton, transformers
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(json.dumps({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "cuda": torch.version.cuda, "commit": commit}, indent=1))'

# the two headline ratios first, measured in one run (the train step is timed here only)
stage headline 180 headline.md "$PY" -m pdfkernels.bench "${QUICK[@]}" --only prefix_attention train_step \
    --select "$HEADLINE_SELECT" --out "$DEST/headline"
if [ "$MODE" = dry ]; then
    echo "then: $PY -m pdfkernels.bench.headline $DEST/headline/*.json (printed first)"
else
    "$PY" -m pdfkernels.bench.headline "$DEST"/headline/*.json 2>&1 | tee "$DEST/headline.txt" || status=1
fi

stage gpu-tests 60 gpu-tests.log "$PY" -m pytest tests -q -m gpu -p no:cacheprovider
# the autotuner's choice per launch key (descriptor vs pointer kernels) goes to the logs
export PDFKERNELS_AUTOTUNE_LOG=1
# prefix attention last: its 2k cases are in the headline already, and a cut part loses only its own figures
stage bench 200 bench.md "$PY" -m pdfkernels.bench "${QUICK[@]}" --only vclub models prefix_attention --out "$DEST"
# the same attention timings (fwd+bwd) with the pointer kernels only and with autotuning off: TMA's share, side by side
stage tma-off 60 bench-tma-off.md env PDFKERNELS_TMA=0 "$PY" -m pdfkernels.bench "${QUICK[@]}" \
    --only prefix_attention --select "prefix_attention=fwd+bwd and pdfkernels" --out "$DEST/tma-off"
stage autotune-off 60 bench-autotune-off.md env PDFKERNELS_AUTOTUNE=0 "$PY" -m pdfkernels.bench "${QUICK[@]}" \
    --only prefix_attention --select "prefix_attention=fwd+bwd and pdfkernels" --out "$DEST/autotune-off"
if [ "$MODE" != cpu ]; then  # on a CPU this is the interpreted suite that CI runs anyway
    stage kernel-tests-on-cuda 600 kernel-tests-on-cuda.log "$PY" -m pytest tests -q -m "not gpu" \
        --deselect tests/test_aot.py -p no:cacheprovider
fi
[ "$MODE" = dry ] && exit 0
echo
cat "$DEST/stages.txt"
tail -n 3 "$DEST"/*.log
echo "results in $DEST (status $status, $(($(date +%s) - START))s)"
exit $status
