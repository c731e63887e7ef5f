#!/usr/bin/env bash
# The test command (README): sets up what the tests need on a fresh machine, then runs them.
# Tier 1 (plain torch) always runs. Tier 2 (inside the real ComfyUI) runs where ComfyUI is found at
# $COMFYUI_PATH (default ~/ComfyUI), using that ComfyUI's own venv; otherwise it is skipped, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFY="${COMFYUI_PATH:-$HOME/ComfyUI}"
TEST_PACKAGES=(pytest hypothesis ruff)
# Tier 2's clients of a real server: the /ws websocket, and the browser driver (it drives Debian's chromium;
# its own browser download is never used).
SERVER_TEST_PACKAGES=(websocket-client playwright)

if [ -f "$COMFY/main.py" ]; then
    [ -x "$COMFY/.venv/bin/python" ] || bash tests/setup_comfyui_venv.sh "$COMFY"
    PY="$COMFY/.venv/bin/python"
    "$PY" -c "import pytest, hypothesis, ruff, websocket, playwright" 2>/dev/null ||
        "$PY" -m pip install -q "${TEST_PACKAGES[@]}" "${SERVER_TEST_PACKAGES[@]}"
    BROWSER="${CHROMIUM_PATH:-$(command -v chromium || command -v chromium-browser || true)}"
    echo "tests: tier 1 and tier 2 (ComfyUI at $COMFY, its venv), with the end-to-end tests on a real ComfyUI server"
    if [ -n "$BROWSER" ]; then
        echo "tests: browser tests in $BROWSER"
    else
        echo "tests: BROWSER TESTS SKIPPED: no chromium (apt-get install chromium, or set CHROMIUM_PATH)"
    fi
else
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -r bench/requirements.txt "${TEST_PACKAGES[@]}"
    fi
    PY=.venv/bin/python
    echo "tests: tier 1 only -- TIER 2 SKIPPED (with the server and browser tests): no ComfyUI at $COMFY (see README, 'Tier 2')"
fi

"$PY" -m ruff check .
# Not `python -m pytest`: that would put the repo root, and our nodes/, on sys.path ahead of ComfyUI's.
exec "$(dirname "$PY")/pytest" "$@"
