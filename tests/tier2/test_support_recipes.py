"""The test-support code that drives ComfyUI, checked cheaply, so that no cached artefact can hide it.

The server tests' SD1.5 checkpoint is cached across sessions, so its recipe used to run only where there was
no cache (issue 10: an import renamed elsewhere broke every server test on a fresh machine, green where the
file was cached). Here every support module imports, every import inside its functions (which runs only when
the function does) resolves, and the recipes are built on the meta device (no memory, seconds) and checked
against SD1.5's own tensors and against what ComfyUI's loaders detect from Flux's files."""

import ast
import importlib
import importlib.util
import math

import pytest
from conftest import ROOT

# (file, its module name, its package for relative imports): tests/*.py are on pytest's pythonpath.
SUPPORT_FILES = [(p, p.stem, None) for p in sorted((ROOT / "tests").glob("*.py")) if p.stem != "conftest"]

SD15_SHAPES = {
    "model.diffusion_model.input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}
# Parameters of SD1.5's UNet, CLIP-L text encoder and VAE, as in its released single-file checkpoint.
SD15_PARTS = {"model.diffusion_model.": 859_520_964, "cond_stage_model.": 123_060_480, "first_stage_model.": 83_653_863}


def imports_inside_functions(path, package):
    """{(module, name or None)} of the imports in the file's function bodies."""
    functions = [f for f in ast.walk(ast.parse(path.read_text())) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = set()
    for node in (n for f in functions for n in ast.walk(f)):
        if isinstance(node, ast.Import):
            found |= {(a.name, None) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            found |= {(module, a.name) for a in node.names}
    return found


def resolves(module, name) -> bool:
    imported = importlib.import_module(module)
    if name is None or hasattr(imported, name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
        return True
    except ImportError:
        return False


@pytest.mark.parametrize(("path", "module", "package"), SUPPORT_FILES, ids=[m for _, m, _ in SUPPORT_FILES])
def test_support_module_and_the_imports_inside_its_functions_resolve(path, module, package):
    importlib.import_module(module)
    lazy = imports_inside_functions(path, package)
    assert not [f"from {m} import {n}" if n else f"import {m}" for m, n in sorted(lazy, key=str) if not resolves(m, n)]


def test_a_renamed_import_inside_a_function_is_caught(tmp_path):
    source = tmp_path / "support.py"
    source.write_text("def f():\n    from comfy_env import _unet_config\n")  # issue 10's bug
    assert imports_inside_functions(source, None) == {("comfy_env", "_unet_config")}
    assert not resolves("comfy_env", "_unet_config") and resolves("comfy_env", "build_sd15")


def test_the_cached_checkpoints_recipe_is_sd15_as_comfyui_detects_it():
    import comfy.model_detection
    import comfy.supported_models
    import torch
    from sd15_checkpoint import sd15_state_dict_shapes

    shapes = sd15_state_dict_shapes()
    assert {name: shapes.get(name) for name in SD15_SHAPES} == SD15_SHAPES
    assert all(name.startswith(tuple(SD15_PARTS)) for name in shapes)
    assert {part: sum(math.prod(s) for n, s in shapes.items() if n.startswith(part)) for part in SD15_PARTS} == SD15_PARTS
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    detected = comfy.model_detection.model_config_from_unet(meta, "model.diffusion_model.")
    assert type(detected) is comfy.supported_models.SD15  # what CheckpointLoaderSimple will load it as


def test_the_flux_files_recipes_are_what_the_stock_loaders_detect():
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models
    import torch
    from flux_files import DEPTH, SINGLE, clip_l_shapes, flux_shapes, t5xxl_shapes, vae_shapes

    def meta(shapes):
        return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}

    dit = flux_shapes()
    assert dit["double_blocks.0.img_attn.proj.weight"] == (3072, 3072) and dit["txt_in.weight"] == (3072, 4096)
    config = comfy.model_detection.detect_unet_config(meta(dit), "")
    assert (config["depth"], config["depth_single_blocks"], config["guidance_embed"]) == (DEPTH, SINGLE, True)
    assert type(comfy.model_detection.model_config_from_unet(meta(dit), "")) is comfy.supported_models.Flux
    assert comfy.sd.detect_te_model(meta(t5xxl_shapes())) == comfy.sd.TEModel.T5_XXL
    assert comfy.sd.detect_te_model(meta(clip_l_shapes())) == comfy.sd.TEModel.CLIP_L
    vae = vae_shapes()
    # Load VAE reads the latent channels from decoder.conv_in; without quant convs it builds Flux's AutoencodingEngine
    assert vae["decoder.conv_in.weight"][1] == 16 and "post_quant_conv.weight" not in vae


def test_a_streamed_file_reads_back_as_written(tmp_path):
    import torch
    from flux_files import write_streamed
    from safetensors.torch import load_file

    tensors = {"b": torch.randn(3, 5), "a": torch.tensor(2.0), "c": torch.randn(7)}
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        write_streamed(tmp_path / "f.safetensors", {k: tuple(v.shape) for k, v in tensors.items()}, dtype,
                       lambda name, shape: tensors[name])
        back = load_file(str(tmp_path / "f.safetensors"))
        assert back.keys() == tensors.keys()
        assert all(torch.equal(back[k], v.to(dtype)) for k, v in tensors.items()), dtype
