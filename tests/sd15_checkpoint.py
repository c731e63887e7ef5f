"""A full-size SD1.5 checkpoint with random weights, for the end-to-end tests against a real server.

CheckpointLoaderSimple detects a model from its tensor names and shapes, so the file has SD1.5's: the
UNet at full width (model channels 320, context 768), the CLIP-L text encoder and the VAE, in the
original single-file layout (`model.diffusion_model.`, `cond_stage_model.`, `first_stage_model.`). The
names and shapes come from ComfyUI's own classes built on the meta device (no memory, no init); the
values are drawn from a seed: matrices N(0, 1/fan_in), norm scales 1, biases 0, which keeps every
activation finite. Stored as fp16 (2.1 GB) and cached across test sessions in $PERSONALIZED_RESIDUALS_CACHE
(default: a folder in the temp folder); CI points that at a fresh empty folder, so the code below always runs there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

LAYOUT_VERSION = 1  # bump when the recipe below changes, so stale cached files are not reused


def sd15_state_dict_shapes() -> dict:
    """{tensor name: shape} of an SD1.5 checkpoint, as ComfyUI's CheckpointSave would name them."""
    import comfy.sd1_clip
    import comfy.supported_models
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfyui_models import unet_config

    vae_config = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        model = comfy.supported_models.SD15(unet_config(model_channels=320, context_dim=768)).get_model({})
        clip = comfy.sd1_clip.SD1ClipModel()
        vae = AutoencoderKL(ddconfig=vae_config, embed_dim=4)
    state = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    return {name: tuple(t.shape) for name, t in state.items()}


def cache_dir() -> Path:
    return Path(os.environ.get("PERSONALIZED_RESIDUALS_CACHE") or Path(tempfile.gettempdir()) / "personalized-residuals-tests")


def random_tensor(name: str, shape: tuple, generator):
    import torch

    if len(shape) >= 2:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        return (torch.randn(shape, generator=generator) * fan_in**-0.5).half()
    if name.endswith((".weight", ".scale")):  # 1-D weights are norm scales (GroupNorm, LayerNorm, RMSNorm)
        return torch.ones(shape, dtype=torch.float16)
    return torch.zeros(shape, dtype=torch.float16)


def random_sd15_checkpoint(seed: int = 0) -> Path:
    """Path of the cached checkpoint for `seed`, written first if absent (about 30 s on 2 cores)."""
    import safetensors.torch
    import torch

    path = cache_dir() / f"sd15-random-v{LAYOUT_VERSION}-seed{seed}.safetensors"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    state = {name: random_tensor(name, shape, generator) for name, shape in sorted(sd15_state_dict_shapes().items())}
    partial = path.with_suffix(f".partial{os.getpid()}")
    safetensors.torch.save_file(state, str(partial), metadata={"note": f"random SD1.5-layout weights, seed {seed}"})
    partial.replace(path)  # atomic: a concurrent or interrupted run never sees half a file
    return path
