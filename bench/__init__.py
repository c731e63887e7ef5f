"""Benchmarks and the evaluation world. Run from the repo root: `python -m bench.<tool>`.

The tools import the pack as ComfyUI does, the repo folder as one package (named `personalized_residuals`
here), never its `nodes/` as a top-level module.
"""

import importlib.util
import sys
from pathlib import Path

PACK = "personalized_residuals"

if PACK not in sys.modules:
    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.util.spec_from_file_location(PACK, _root / "__init__.py", submodule_search_locations=[str(_root)])
    sys.modules[PACK] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[PACK])
