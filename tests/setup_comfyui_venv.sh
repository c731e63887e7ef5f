#!/usr/bin/env bash
# Creates the venv a ComfyUI checkout needs to run (and to run tier 2): torch 2.14.1 with the
# torchvision that loads beside it, ComfyUI's requirements (its torch lines excepted, its frontend package
# included), requests, which ComfyUI imports without listing it, and the test tools (the end-to-end
# tests' websocket client and browser driver among them).
set -euo pipefail
COMFY="${1:-${COMFYUI_PATH:-$HOME/ComfyUI}}"
python3 -m venv "$COMFY/.venv"
PIP=("$COMFY/.venv/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
grep -vE '^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$COMFY/.venv/requirements-no-torch.txt"
"${PIP[@]}" -r "$COMFY/.venv/requirements-no-torch.txt" requests pytest hypothesis ruff websocket-client playwright
