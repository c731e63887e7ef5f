#!/usr/bin/env bash
# The speed benchmark on a GPU machine, in one call of under 8 minutes: bench.perf at 512 px (training and
# sampling steps against ComfyUI's built-in trainer and the plain model) plus one whole 150-step, 512 px,
# batch-4 training run. Target on one H100: the 150 steps in under 15 s (the paper: ~180 s on an A100).
#
# The GPU machine has PyTorch but neither ComfyUI nor all of its packages, and no network. On this machine,
# first run `bash bench/prepare_device.sh` (puts a copy of ComfyUI's Python code in .device/comfyui and the
# missing wheels in .device/wheels, both git-ignored), then carry `.device` and run this script there:
#   (the device tool: carry [".device"], command "bash bench/gpu_check.sh")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
if [ -d .device/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export COMFYUI_PATH="${COMFYUI_PATH:-$PWD/.device/comfyui}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m bench.perf --device cuda --size 512 --batch 4 --repeats 5 --full-run 150 --out "$OUT_DIR/perf_cuda.md"
