"""The one place the pack is imported the way ComfyUI imports it: the repo folder as one package (here under
the name `personalized_residuals`), so its modules' relative imports work and its `nodes/` never becomes a
top-level module that would shadow ComfyUI's own `nodes`. Tests (conftest.py), tests/precision_check.py,
the benchmarks (bench/__init__.py) and the docs' drawing scripts call import_pack()."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
PACK = "personalized_residuals"


def import_pack() -> ModuleType:
    """The pack as `personalized_residuals`, and the test-support modules (tests/*.py) importable by name."""
    # `python -m ...` from the repo root puts the root on sys.path, exposing nodes/ as `nodes`.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        sys.modules[PACK] = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(sys.modules[PACK])
        except BaseException:
            del sys.modules[PACK]
            raise
    return sys.modules[PACK]
