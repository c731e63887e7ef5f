"""Test set-up shared by both tiers.

The pack is imported the way ComfyUI imports it: the repo folder as one package (here under the name
`personalized_residuals`), so its modules use relative imports and its `nodes/` never becomes a
top-level module that would shadow ComfyUI's own `nodes`.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = "personalized_residuals"

# `python -m pytest` from the repo root puts the root on sys.path, exposing nodes/ as `nodes`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

if PACK not in sys.modules:
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules[PACK] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[PACK])
