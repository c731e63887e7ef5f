"""Says loudly whether tier 2 ran: this test is skipped, with the reason, when ComfyUI is absent."""

import pytest
from comfy_env import COMFY, SKIPPED


def test_comfyui_is_present_for_tier_2():
    if SKIPPED:
        pytest.skip(f"TIER 2 SKIPPED (with the server and browser tests): {SKIPPED}")
    import comfyui_version

    assert (COMFY / "main.py").is_file()
    print(f"\ntier 2 runs against ComfyUI {comfyui_version.__version__} at {COMFY}")
