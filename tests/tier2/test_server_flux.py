"""The Flux workflows in the real ComfyUI server, end to end over HTTP, on random weights (tests/flux_files.py):
Flux.1 at its full width with one double and one single block, the full CLIP-L and T5-XXL (fp8), Flux's VAE,
read by the stock loaders the workflows name; the LoRAs they name are random kohya-named Flux LoRAs. 64 px, two
steps. Slow on two CPU cores (T5-XXL is 4.7B parameters, run once per prompt), so every run here counts."""

import re

import pytest
from comfy_server import MODEL_FOLDERS, api_client, api_workflow, picture, steps_reported
from flux_files import DEPTH, SINGLE, flux_shapes, write_flux_lora
from personalized_residuals.residual_core import fileformat

pytestmark = pytest.mark.server
T5_FP8 = "t5xxl_fp8_e4m3fn.safetensors"  # what the workflows' t5xxl_fp16 becomes here: half the memory
# The LoRAs' layers: LAG masks those with image tokens (on their image rows), 'unmaskable_layers' rules the others.
MASKED = ("img_attn.proj", "img_mlp.0", "img_mlp.2", "linear1", "linear2")
UNMASKABLE = ("txt_attn.qkv", "img_mod.lin")


def flux_graph(name: str) -> dict:
    return api_workflow(name, DualCLIPLoader={"clip_name2": T5_FP8})


@pytest.fixture(scope="module")
def flux_models(comfy_server, client, flux_files_writer):
    """The server's models folder with the Flux files in place of the placeholders, and the SD models unloaded."""
    files, shapes = flux_files_writer.files(), flux_shapes()
    models = comfy_server.base / "models"
    for graph in (flux_graph("flux_lag_lora"), flux_graph("flux_two_loras")):
        for node in graph.values():
            for key, value in node["inputs"].items():
                if key in files:
                    target = models / MODEL_FOLDERS[key] / value
                    target.unlink(missing_ok=True)
                    target.symlink_to(files[key])
                elif key == "lora_name":  # a user's Flux LoRA on both kinds of layer
                    write_flux_lora(models / MODEL_FOLDERS[key] / value, shapes,
                                    lambda layer: layer.endswith(MASKED + UNMASKABLE))
    client.free()  # the SD tests' checkpoint: Flux needs the memory
    return models


def flux_training_graph() -> dict:
    """train_and_sample with Flux.1's three loaders in place of the checkpoint, cfg 1 and a zeroed negative, and
    T5 unpadded (T5TokenizerOptions, as Chroma's workflows set it)."""
    graph = api_workflow("train_and_sample")
    loaders = {n["class_type"]: n for n in flux_graph("flux_lag_lora").values()}
    del graph["1"]  # the checkpoint: its MODEL, CLIP and VAE outputs come from these now
    graph |= {"21": loaders["UNETLoader"], "22": loaders["DualCLIPLoader"], "23": loaders["VAELoader"],
              "24": {"class_type": "T5TokenizerOptions", "inputs": {"clip": ["22", 0], "min_padding": 1, "min_length": 0}}}
    outputs = {0: ["21", 0], 1: ["24", 0], 2: ["23", 0]}
    for node in graph.values():
        node["inputs"] |= {k: outputs[v[1]] for k, v in node["inputs"].items() if v in (["1", 0], ["1", 1], ["1", 2])}
    lag = api_client().node_of(graph, "PersonalizedResidualLAGSampler")
    graph[lag]["inputs"]["prompt"] = "a photo of a sks dog"  # training's, and the sample grid's: one T5-XXL pass
    negative, ksampler = (api_client().node_of(graph, kind) for kind in ("CLIPTextEncode", "KSampler"))
    graph[negative] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": graph[ksampler]["inputs"]["positive"]}}
    graph[ksampler]["inputs"] |= {"cfg": 1.0, "scheduler": "simple"}
    return graph


def run_flux(client, comfy_server, graph):
    """Run `graph` over HTTP; the run, and the render and mask preview it shows (64 px, two KSampler steps)."""
    run = client.run(graph)
    assert run.error is None, f"{run.error}\n{comfy_server.log_tail()}"
    assert run.history["status"]["status_str"] == "success"
    node_of = api_client().node_of
    assert steps_reported(run, node_of(graph, "KSampler")) == [(1, 2), (2, 2)]
    [render] = run.images(node_of(graph, "SaveImage"))
    [preview] = run.images(node_of(graph, "PersonalizedResidualLAGMaskPreview"))
    image, tinted = picture(client, render), picture(client, preview)
    assert image.shape == tinted.shape == (64, 64, 3) and image.std() > 0
    assert (tinted != image).any(), "the mask preview shows no mask"
    return run


def test_the_stock_loaders_read_flux_from_the_files_and_lag_lora_renders(flux_models, client, comfy_server):
    run_flux(client, comfy_server, flux_graph("flux_lag_lora"))
    log = comfy_server.log()
    assert "model_type FLUX" in log, comfy_server.log_tail()
    mismatch = re.search(r"unet (missing|unexpected)|clip missing|Missing VAE keys|left over keys.*", log)
    assert mismatch is None, f"a file's tensors do not match the model ComfyUI built: {mismatch.group(0)[:300]}"
    assert f"LAG LoRA flux_sks_dog_lora.safetensors: {len(MASKED)} layers masked, {len(UNMASKABLE)} other" in log


def test_two_flux_loras_each_in_its_own_mask(flux_models, client, comfy_server):
    run_flux(client, comfy_server, flux_graph("flux_two_loras"))
    assert f"LAG LoRA flux_zwx_cat_lora.safetensors: {len(MASKED)} layers masked" in comfy_server.log()


def test_train_on_flux_save_and_sample_with_lag(flux_models, client, comfy_server):
    graph = flux_training_graph()
    run = run_flux(client, comfy_server, graph)
    node_of = api_client().node_of
    assert steps_reported(run, node_of(graph, "PersonalizedResidualTrain")) == [(1, 2), (2, 2)]
    assert len(run.images(node_of(graph, "PreviewImage", "samples"))) == 1
    saved = run.outputs[node_of(graph, "PersonalizedResidualSave")]["residual_name"][0]
    residual = fileformat.load(str(comfy_server.loras / saved))
    assert residual.meta.base_family == f"custom-flux-{DEPTH}+{SINGLE}x3072"
    assert sorted(residual.layers) == ["double_blocks.0.img_attn.proj", "single_blocks.0.linear2"]
