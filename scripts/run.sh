#!/usr/bin/env bash
# The main job: PDF training on the built-in default (generated shapes data, tiny Qwen2-VL, CPU), ending
# with Precision@1 for single prefix, aggregate and no prefix beside chance. Extra flags go to train.run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python -m pdfkernels.train.run --config train/configs/demo.yaml "$@"
