#!/usr/bin/env bash
# The test command (README): sets up what the tests need on a fresh machine, then runs them.
# Tier 1 (plain torch) always runs. Tier 2 (inside the real ComfyUI) runs where ComfyUI is found at
# $COMFYUI_PATH (default ~/ComfyUI), using that ComfyUI's own venv; otherwise it is skipped, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFY="${COMFYUI_PATH:-$HOME/ComfyUI}"
TEST_PACKAGES=(pytest hypothesis ruff)

if [ -f "$COMFY/main.py" ]; then
    [ -x "$COMFY/.venv/bin/python" ] || bash tests/setup_comfyui_venv.sh "$COMFY"
    PY="$COMFY/.venv/bin/python"
    "$PY" -c "import pytest, hypothesis, ruff" 2>/dev/null || "$PY" -m pip install -q "${TEST_PACKAGES[@]}"
    echo "tests: tier 1 and tier 2 (ComfyUI at $COMFY, its venv)"
else
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q torch==2.13.0 safetensors numpy einops "${TEST_PACKAGES[@]}"
    fi
    PY=.venv/bin/python
    echo "tests: tier 1 only -- TIER 2 SKIPPED: no ComfyUI at $COMFY (see README, 'Tier 2')"
fi

"$PY" -m ruff check .
# Not `python -m pytest`: that would put the repo root, and our nodes/, on sys.path ahead of ComfyUI's.
exec "$(dirname "$PY")/pytest" "$@"
