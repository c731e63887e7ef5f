"""Every test-support module imports. A broken one would otherwise show only as errors in the tests that use
it, or not at all where those are skipped. Tier 2's test_support_recipes.py covers those that import ComfyUI
and runs the ComfyUI code inside their functions."""

import importlib

import pytest
from conftest import PACK, ROOT

IMPORTS_COMFYUI = {"comfy_env", "comfy_server"}  # importing them imports ComfyUI where there is one: tier 2's


def support_modules() -> list[str]:
    """tests/*.py by module name (they are on pytest's pythonpath), and bench/ as part of the pack."""
    tests = [p.stem for p in (ROOT / "tests").glob("*.py") if p.stem != "conftest"]
    bench = [".".join((PACK, *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
             for p in (ROOT / "bench").rglob("*.py")]
    return sorted(tests) + sorted(bench)


def test_the_support_modules_are_found():
    found = set(support_modules())
    assert {"helpers", "sd15_checkpoint", "comfyui_models", f"{PACK}.bench.world.unet", f"{PACK}.bench.world.model"} <= found


@pytest.mark.parametrize("name", [m for m in support_modules() if m not in IMPORTS_COMFYUI])
def test_support_module_imports(name):
    try:
        importlib.import_module(name)
    except Exception as e:
        pytest.fail(f"test-support module {name} does not import: {e!r}")
