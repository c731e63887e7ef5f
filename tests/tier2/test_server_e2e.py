"""The pack in a real ComfyUI server, driven over HTTP as headless users drive it: each API workflow POSTed
to /prompt, followed on the /ws websocket, read back from /history and /view (comfy_server.py has the set-up:
a random full-size SD1.5 checkpoint, 64 px photos, two steps). Bad inputs come back as node errors that
name the input and the fix, and the server goes on serving."""

import itertools
import math
import re
import subprocess
import sys

import pytest
from comfy_server import ROOT, api_client, api_workflow, picture, steps_reported, workflow_checkpoint, write_photos
from personalized_residuals.residual_core import ResidualMeta, ResidualSet, fileformat, find_targets
from PIL import Image

pytestmark = pytest.mark.server
SD15_PARAMETERS = 1_239_040  # ranks 16/32/64 on SD1.5's 16 proj_out (README)


def node_of(graph, class_type, title=None):
    return api_client().node_of(graph, class_type, title)


def assert_succeeded(run):
    assert run.error is None, run.error
    assert run.history["status"]["status_str"] == "success"
    types = [e["type"] for e in run.events]
    assert types[0] == "execution_start" and "execution_success" in types


def test_train_and_save_writes_the_residual_with_its_metadata_and_the_loss_curve(trained, client, comfy_server):
    graph = api_workflow("train_and_save")
    assert_succeeded(trained)
    assert steps_reported(trained, node_of(graph, "PersonalizedResidualTrain")) == [(1, 2), (2, 2)]

    save = trained.outputs[node_of(graph, "PersonalizedResidualSave")]
    assert save["residual_name"] == ["sks_dog_00001.safetensors"]
    assert save["text"] == ["saved models/loras/personalized_residuals/sks_dog_00001.safetensors"]
    residual = fileformat.load(str(comfy_server.loras / "sks_dog_00001.safetensors"))
    meta = residual.meta
    assert (meta.class_word, meta.identifier, meta.steps, meta.batch_size, meta.seed) == ("dog", "sks", 2, 2, 0)
    assert meta.base_family == "sd1" and re.fullmatch(r"[0-9a-f]{16}", meta.base_hash)
    assert residual.num_parameters() == SD15_PARAMETERS

    [curve] = trained.images(node_of(graph, "PreviewImage", "loss curve"))
    assert curve["type"] == "temp"
    pixels = picture(client, curve)
    assert pixels.shape == (360, 640, 3) and pixels.std() > 0
    logged = re.search(r"Personalized residual 'sks dog': 2 steps on 3 photos .* loss (\S+) -> (\S+)", comfy_server.log())
    assert logged, comfy_server.log_tail()
    assert all(math.isfinite(float(v)) for v in logged.groups())


def test_load_and_sample_renders_with_lag_and_shows_the_mask(trained, client):
    graph = api_workflow("load_and_sample")
    run = client.run(graph)
    assert_succeeded(run)
    assert steps_reported(run, node_of(graph, "KSampler")) == [(1, 2), (2, 2)]
    [render] = run.images(node_of(graph, "SaveImage"))
    [preview] = run.images(node_of(graph, "PersonalizedResidualLAGMaskPreview"))
    assert render["type"] == "output"
    image, tinted = picture(client, render), picture(client, preview)
    assert image.shape == tinted.shape == (64, 64, 3) and image.std() > 0
    assert (tinted != image).any(), "the mask preview shows no mask"


def test_train_and_sample_in_one_graph(client, comfy_server):
    graph = api_workflow("train_and_sample", PersonalizedResidualTrain={"seed": 1})  # not the cached residual
    run = client.run(graph)
    assert_succeeded(run)
    assert steps_reported(run, node_of(graph, "PersonalizedResidualTrain")) == [(1, 2), (2, 2)]
    saved = run.outputs[node_of(graph, "PersonalizedResidualSave")]["residual_name"][0]
    assert (comfy_server.loras / saved).is_file() and fileformat.load(str(comfy_server.loras / saved)).meta.seed == 1
    for node, title in (("PreviewImage", "loss curve"), ("PreviewImage", "samples"), ("SaveImage", None),
                        ("PersonalizedResidualLAGMaskPreview", None)):
        assert len(run.images(node_of(graph, node, title))) == 1, (node, title)


def test_two_concepts_trained_and_sampled_in_one_graph(client, comfy_server):
    graph = api_workflow("two_concepts")
    run = client.run(graph)
    assert_succeeded(run)
    saved = {o["residual_name"][0] for n, o in run.outputs.items() if "residual_name" in o}
    assert {name.split("_0")[0] for name in saved} == {"sks_dog", "zwx_cat"}
    for name in saved:
        assert fileformat.load(str(comfy_server.loras / name)).meta.identifier in ("sks", "zwx")
    [render] = run.images(node_of(graph, "SaveImage"))
    [preview] = run.images(node_of(graph, "PersonalizedResidualLAGMaskPreview"))
    assert picture(client, render).shape == picture(client, preview).shape == (64, 64, 3)


def test_the_stock_lora_loader_applies_the_saved_file(trained, client):
    graph = api_workflow("stock_lora_loader")
    run = client.run(graph)
    assert_succeeded(run)
    assert picture(client, run.images(node_of(graph, "SaveImage"))[0]).shape == (64, 64, 3)


# ---------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def sdxl_residual(comfy_server):
    """A residual made for SDXL (real widths, on the meta device: shapes only), saved where Load Residual looks."""
    import comfy.supported_models
    import torch
    from comfyui_models import unet_config

    config = unet_config(model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                         transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                         transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True,
                         context_dim=2048, num_heads=-1, num_head_channels=64, num_classes="sequential",
                         adm_in_channels=2816)
    with torch.device("meta"):
        unet = comfy.supported_models.SDXL(config).get_model({}).diffusion_model
    residual = ResidualSet.for_targets(find_targets(unet), 0.05, "zero", 0, ResidualMeta(class_word="dog", identifier="sks"))
    assert residual.meta.base_family == "sdxl"
    comfy_server.loras.mkdir(parents=True, exist_ok=True)
    fileformat.save(residual, str(comfy_server.loras / "sdxl_dog.safetensors"))
    return "sdxl_dog.safetensors"


@pytest.fixture(scope="module")
def empty_folder(comfy_server):
    (comfy_server.base / "input" / "empty").mkdir()
    return "empty"


FRESH_SEEDS = itertools.count(100)  # a new KSampler seed for each check prompt
BAD_INPUTS = {  # (workflow, node, input, value or the fixture that makes it, the node that fails, phrases of the message)
    # ComfyUI's own folder loader refuses an empty folder before our trainer runs (its message, not ours).
    "no photos": ("train_and_save", "LoadImageSetFromFolderNode", "folder", "empty_folder",
                  "LoadImageSetFromFolderNode", ["No valid images found in input"]),
    "class word missing from the prompt": ("load_and_sample", "PersonalizedResidualLAGSampler", "prompt",
                                           "a photo of a sks cat on the beach", "PersonalizedResidualLAGSampler",
                                           ["class word 'dog' is not in the prompt", "as 'sks dog'"]),
    "residual of another model family": ("load_and_sample", "PersonalizedResidualLoad", "residual_name", "sdxl_residual",
                                         "PersonalizedResidualLAGSampler",
                                         ["made for SDXL", "the model is SD1.x", "this model's family (SD1.x)"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_come_back_as_node_errors_and_the_server_keeps_serving(case, trained, client, request):
    workflow, class_type, name, value, failing, phrases = BAD_INPUTS[case]
    if value in ("empty_folder", "sdxl_residual"):
        value = request.getfixturevalue(value)
    run = client.run(api_workflow(workflow, **{class_type: {name: value}}))
    error = run.error
    assert error and error["node_type"] == failing, run.events
    for phrase in phrases:
        assert phrase in error["exception_message"], error["exception_message"]
    assert run.history["status"]["status_str"] == "error"
    assert ["execution_error", error] in run.history["status"]["messages"]  # /history says what /ws said

    check = api_workflow("load_and_sample", KSampler={"seed": next(FRESH_SEEDS)})
    after = client.run(check)
    assert_succeeded(after)
    assert steps_reported(after, node_of(check, "KSampler")) == [(1, 2), (2, 2)]  # it ran, not from the cache


def test_a_value_not_in_a_list_is_refused_before_running_and_names_the_input(client):
    with pytest.raises(api_client().PromptRejected) as refused:
        client.run(api_workflow("train_and_save", LoadImageSetFromFolderNode={"folder": "no_such_folder"}))
    [(node_id, info)] = refused.value.node_errors.items()
    assert info["class_type"] == "LoadImageSetFromFolderNode"
    assert "folder" in str(info["errors"]) and "no_such_folder" in str(info["errors"])


# ---------------------------------------------------------------------- the headless client users get

def run_client(comfy_server, *args):
    command = [sys.executable, str(ROOT / "scripts" / "api_client.py"), "--server", comfy_server.url,
               "--checkpoint", workflow_checkpoint(), "--width", "64", "--height", "64", "--sample-steps", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_the_headless_client_trains_from_a_folder_and_renders_prompts(comfy_server, tmp_path):
    write_photos(tmp_path / "photos")
    out = tmp_path / "out"
    done = run_client(comfy_server, "--photos", str(tmp_path / "photos"), "--class-word", "cat", "--identifier", "zwx",
                      "--steps", "2", "--resolution", "64", "--batch-size", "2", "--train-sample-steps", "2",
                      "--out", str(out),
                      "--prompt", "a photo of a zwx cat on the beach", "--prompt", "a zwx cat in the snow")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"uploaded 3 photos to input/personalized_residuals/zwx_cat_[0-9a-f]{10}/", done.stdout)
    assert "running Train Personalized Residual" in done.stdout and "step 2/2" in done.stdout
    saved = re.search(r"saved models/loras/personalized_residuals/(zwx_cat_\d{5}\.safetensors)", done.stdout)
    assert saved, done.stdout  # (two_concepts may have saved a zwx_cat before: any free number)
    assert fileformat.load(str(comfy_server.loras / saved.group(1))).meta.class_word == "cat"
    sizes = {p.name: Image.open(p).size for p in out.iterdir()}
    grid = sizes.pop("samples.png", None)  # base and residual side by side, under the prompt's label
    assert grid is not None and grid[0] >= 2 * 64 and grid[1] > 64, sizes
    assert sizes == {"loss_curve.png": (640, 360), "render_00.png": (64, 64), "render_01.png": (64, 64),
                     "lag_mask_00.png": (64, 64), "lag_mask_01.png": (64, 64)}


def test_the_headless_client_says_which_input_is_wrong(trained, comfy_server, tmp_path):
    done = run_client(comfy_server, "--residual", "sks_dog_00001.safetensors", "--prompt", "a photo of a sks cat",
                      "--out", str(tmp_path))
    assert done.returncode != 0
    assert "failed in PersonalizedResidualLAGSampler: The class word 'dog' is not in the prompt" in done.stderr
