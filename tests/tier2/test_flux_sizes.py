"""bench/flux_sizes.py's numbers (the README's Flux memory) come from ComfyUI's own Flux class at full size."""

import pytest
from comfy_env import SKIPPED

pytestmark = pytest.mark.skipif(SKIPPED is not None, reason=str(SKIPPED))

FLUX_DEV_PARAMETERS = 11_901_408_320  # flux1-dev's transformer, as its released safetensors hold it


def test_comfyuis_detection_builds_flux_dev_from_its_keys():
    from personalized_residuals.bench.flux_sizes import build_flux_dev

    model, config = build_flux_dev()
    assert (config["depth"], config["depth_single_blocks"], config["guidance_embed"]) == (19, 38, True)
    assert sum(p.numel() for p in model.parameters()) == FLUX_DEV_PARAMETERS


def test_training_memory_counts_what_autograd_saves_and_checkpointing_keeps_less():
    from personalized_residuals.bench import flux_sizes

    model, config = flux_sizes.build_flux_dev()
    one = ["double_blocks.18.img_attn.proj"]
    late = flux_sizes.training_memory(model, config, one, checkpoint_blocks=False)
    model, _ = flux_sizes.build_flux_dev()
    every = flux_sizes.training_memory(model, config, ["double_blocks.0.img_attn.proj", *one], checkpoint_blocks=False)
    # A residual in the first block makes backward reach every block: more is kept than for the last double block.
    assert every["bytes"] > late["bytes"] > 0
    model, _ = flux_sizes.build_flux_dev()
    recomputed = flux_sizes.training_memory(model, config, ["double_blocks.0.img_attn.proj", *one], checkpoint_blocks=True)
    assert recomputed["bytes"] < every["bytes"]
    assert every["residual_params"] == 2 * 154 * (3072 + 3072)
