#!/usr/bin/env bash
# Gathers what bench/gpu_check.sh needs on a GPU machine that has PyTorch but no ComfyUI and no network:
# ComfyUI's Python code (from $COMFYUI_PATH, default ~/ComfyUI; only .py files and the SD1 tokenizer, never
# committed: .device/ is git-ignored) and the wheels of the packages ComfyUI imports that the machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFY="${COMFYUI_PATH:-$HOME/ComfyUI}"
rm -rf .device && mkdir -p .device/comfyui .device/wheels
(cd "$COMFY" && find . -name '*.py' -not -path './.venv/*' -not -path './tests*' -not -path './custom_nodes/*' \
    -not -path './comfy_api_nodes/*' -print0 | xargs -0 tar cf - comfy/sd1_tokenizer) | tar xf - -C .device/comfyui
# Python 3.12 on the GPU machine (its image); av, torchsde and trampoline are not in it.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels av torchsde trampoline
du -sh .device/comfyui .device/wheels
