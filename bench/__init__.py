"""Benchmarks and the evaluation world. Run from the repo root: `python -m bench.<tool>`.

The tools import the pack as ComfyUI does, the repo folder as one package (named `personalized_residuals`
here), never its `nodes/` as a top-level module: tests/pack_alias.py, the one place that is done, which also
makes the test-support modules (tests/comfyui_models.py: ComfyUI's models with random weights) importable.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pack_alias import import_pack  # noqa: E402

import_pack()
