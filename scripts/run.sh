#!/usr/bin/env bash
# The main job: PDF training on the built-in default (generated shapes data, tiny Qwen2-VL, CPU), ending
# with Precision@1 for single prefix, aggregate and no prefix beside chance. Extra flags go to train.run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
# The demo folder (runs/demo) is replaced on every run, unless the flags say otherwise (--resume,
# --overwrite or another --out-dir); the trainer itself refuses a folder holding an earlier run.
replace=(--overwrite)
for arg in "$@"; do
  case "$arg" in --resume|--overwrite|--out-dir|--out-dir=*) replace=() ;; esac
done
exec .venv/bin/python -m pdfkernels.train.run --config train/configs/demo.yaml ${replace[@]+"${replace[@]}"} "$@"
