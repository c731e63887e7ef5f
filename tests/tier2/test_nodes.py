"""Every node through ComfyUI: the pack loader, schemas, execute(), files, and the errors users see."""

import asyncio
from pathlib import Path

import comfy.lora
import folder_paths
import pytest
import torch
from comfy_env import run, train
from personalized_residuals.nodes import NODES
from personalized_residuals.nodes.files import LoadResidual, SaveResidual
from personalized_residuals.nodes.lag import LagMaskPreview, LagSampler
from personalized_residuals.residual_core import ResidualError, ResidualSet, find_targets

import nodes as comfy_nodes

ROOT = Path(__file__).resolve().parents[2]
NODE_IDS = {
    "PersonalizedResidualTrain": "Train Personalized Residual",
    "PersonalizedResidualSave": "Save Residual",
    "PersonalizedResidualLoad": "Load Residual",
    "PersonalizedResidualLAGSampler": "LAG Sampler",
    "PersonalizedResidualLAGLoRA": "LAG LoRA",
    "PersonalizedResidualLAGMaskPreview": "LAG Mask Preview",
}


PHOTOS = [torch.rand(2, 64, 64, 3), torch.rand(1, 96, 64, 3)]  # a list of two sizes, as from a folder


def test_comfyuis_own_loader_registers_the_six_nodes():
    for node_id in NODE_IDS:
        comfy_nodes.NODE_CLASS_MAPPINGS.pop(node_id, None)
    assert asyncio.run(comfy_nodes.load_custom_node(str(ROOT))) is True
    for node_id, display in NODE_IDS.items():
        assert node_id in comfy_nodes.NODE_CLASS_MAPPINGS
        assert comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display


def test_stable_ids_and_a_tooltip_on_every_input_and_output():
    assert {n.define_schema().node_id for n in NODES} == set(NODE_IDS)
    for node in NODES:
        schema = node.define_schema()
        schema.validate()
        assert schema.description, node
        for item in schema.inputs + schema.outputs:
            assert item.tooltip and len(item.tooltip) > 10, (schema.node_id, item.id)


def test_train_save_load_and_sample_like_a_user(sd15, clip, vae, loras_dir):
    residual, curve, _ = train(sd15, clip, vae, PHOTOS)
    assert curve.shape == (1, 360, 640, 3) and residual.meta.class_word == "dog"
    assert residual.meta.base_family.startswith("custom-16x")  # SD1.5's 16 blocks at test widths
    name = run(SaveResidual, residual, "")[0]
    again = run(SaveResidual, residual, "")[0]
    assert name == "personalized_residuals/sks_dog_00001.safetensors" and again.endswith("_00002.safetensors")
    assert name in folder_paths.get_filename_list("loras"), "the stock LoRA loaders list it"
    assert LoadResidual.define_schema().inputs[0].options == ["sks_dog_00001.safetensors", "sks_dog_00002.safetensors"]
    loaded, class_word, identifier = run(LoadResidual, "sks_dog_00001.safetensors")
    assert (class_word, identifier) == ("dog", "sks")
    for key, layer in residual.layers.items():
        assert torch.equal(loaded.layers[key].up, layer.up)

    m, positive = run(LagSampler, sd15, loaded, clip, "a sks dog in the snow", 1.0, "LAG", "max_fraction", 0.5,
                                     0.0, 1.0)
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    with torch.inference_mode():
        latent = comfy_nodes.common_ksampler(m, 0, 3, 4.0, "euler", "normal", positive, negative,
                                             {"samples": torch.zeros(1, 4, 8, 8)})[0]
    preview = run(LagMaskPreview, m, latent)[0]
    assert preview.shape == (1, 64, 64, 3) and 0 <= float(preview.min()) and float(preview.max()) <= 1
    decoded = torch.rand(1, 64, 64, 3)
    over = run(LagMaskPreview, m, latent, decoded)[0]
    assert over.shape == decoded.shape and not torch.equal(over, decoded)


def test_stock_lora_loader_applies_a_saved_residual_to_all_16_sd15_proj_out_keys(sd15, clip, vae, loras_dir):
    residual, _, _ = train(sd15, clip, vae, PHOTOS, init="random")
    name = run(SaveResidual, residual, "stock")[0]
    m = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(sd15, name, 1.0)[0]
    keys = sorted(k for k in m.patches if k.endswith("proj_out.weight"))
    assert len(keys) == 16 and len(m.patches) == 16
    key = "diffusion_model.input_blocks.1.1.proj_out.weight"
    merged = comfy.lora.calculate_weight(m.patches[key], sd15.model.state_dict()[key].clone(), key)
    layer = residual.layers["input_blocks.1.1.proj_out"]
    expected = sd15.model.state_dict()[key] + layer.weight_delta().view_as(merged)
    assert torch.allclose(merged, expected, atol=1e-6)


def test_users_get_errors_that_name_the_input_and_the_fix(sd15, clip, vae, sdxl, loras_dir):
    with pytest.raises(ResidualError, match="images: no photos"):
        train(sd15, clip, vae, [])
    with pytest.raises(ResidualError, match="class_word and identifier must not be empty"):
        train(sd15, clip, vae, PHOTOS, class_word=" ")
    residual, _, _ = train(sd15, clip, vae, PHOTOS, steps=1)
    with pytest.raises(ResidualError, match="class word 'dog' is not in the prompt"):
        run(LagSampler, sd15, residual, clip, "a photo of a sks cat", 1.0, "LAG", "max_fraction", 0.5, 0.0, 1.0)
    sdxl_residual = ResidualSet.for_targets(find_targets(sdxl.model.diffusion_model))
    with pytest.raises(ResidualError, match="made for .* \\(11 transformer blocks\\) but the model "
                                             "is .* \\(16 transformer blocks\\)"):
        run(LagSampler, sd15, sdxl_residual, clip, "a sks dog", 1.0, "LAG", "max_fraction", 0.5, 0.0, 1.0)
    with pytest.raises(ResidualError, match="must not exceed end_percent"):
        run(LagSampler, sd15, residual, clip, "a sks dog", 1.0, "LAG", "max_fraction", 0.5, 0.8, 0.2)
    with pytest.raises(ResidualError, match="no LAG patch"):
        run(LagMaskPreview, sd15, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ResidualError, match="must be a plain name"):
        run(SaveResidual, residual, "../../escape")
    with pytest.raises(ResidualError, match="No residual file"):
        run(LoadResidual, "missing.safetensors")


def test_every_advice_the_core_names_is_worded_for_the_ui():
    """The core names a UI fix by key (ResidualError.advice); nodes/advice.py words each one."""
    import re
    from pathlib import Path

    from personalized_residuals.nodes.advice import ADVICE

    core = Path(__file__).resolve().parents[2] / "residual_core"
    used = {k for f in core.glob("*.py") for k in re.findall(r'advice="(\w+)"', f.read_text())}
    assert used and used <= set(ADVICE), used - set(ADVICE)
