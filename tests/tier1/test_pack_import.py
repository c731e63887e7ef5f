"""The pack as ComfyUI sees it: a folder imported as one package, with nothing heavy at import time."""

import asyncio
import importlib.util
import re
import sys

from conftest import ROOT


def test_the_folder_imports_as_a_package_the_way_comfyui_loads_it_without_comfyui():
    name = str(ROOT).replace(".", "_x_")  # ComfyUI's own naming for custom node folders
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    before = set(sys.modules)
    try:
        spec.loader.exec_module(module)
        assert asyncio.iscoroutinefunction(module.comfy_entrypoint)
        assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "V3 only: ComfyUI ignores comfy_entrypoint beside it"
        assert f"{name}.nodes" not in sys.modules, "nodes are imported only when ComfyUI asks for them"
        core = importlib.import_module(f"{name}.residual_core")
        assert not any(m.split(".")[0] in ("comfy", "comfy_api", "folder_paths") for m in set(sys.modules) - before)
        assert core.ResidualSet is not None
    finally:
        for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[m]



def test_pack_code_uses_relative_imports_and_never_unpickles():
    for path in [*ROOT.glob("*.py"), *ROOT.glob("nodes/*.py"), *ROOT.glob("residual_core/*.py")]:
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) (nodes|residual_core)\b", text, re.M), f"absolute import in {path}"
        assert "torch.load(" not in text and "import pickle" not in text, f"pickle loading in {path}"
    core = "\n".join(p.read_text() for p in ROOT.glob("residual_core/*.py"))
    assert not re.search(r"^\s*(from|import) (comfy|comfy_api|folder_paths)", core, re.M)
