"""Tier 2's access to the real ComfyUI ($COMFYUI_PATH, default ~/ComfyUI), imported in-process.

Models are built through ComfyUI's own SD1.5 / SD2 / SDXL classes with random weights, at small widths
and latent sizes so they run on a CPU in seconds; the block layout (and so every proj_out key) is the
real one. Without ComfyUI every tier-2 test is skipped, and the run says so loudly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

COMFY = Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()


def _bootstrap() -> str | None:
    """Import ComfyUI as main.py --cpu would; return why not, or None."""
    if not (COMFY / "main.py").is_file():
        return f"no ComfyUI at {COMFY} (set COMFYUI_PATH to a ComfyUI checkout)"
    sys.path.insert(0, str(COMFY))
    argv, sys.argv = sys.argv, [str(COMFY / "main.py"), "--cpu"]
    before = set(sys.modules)
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses --cpu once, at import)
        import comfy.model_management  # noqa: F401
        import comfy_api.latest  # noqa: F401

        import nodes  # noqa: F401  (ComfyUI's own top-level module)
    except ImportError as e:  # leave no half-imported ComfyUI behind
        sys.path.remove(str(COMFY))
        for name in set(sys.modules) - before:
            del sys.modules[name]
        return f"ComfyUI at {COMFY} does not import with this Python ({e}); tests/run.sh uses its venv"
    finally:
        sys.argv = argv
    return None


SKIPPED = _bootstrap()


# ---------------------------------------------------------------- tiny models through ComfyUI's classes

def _unet_config(**overrides):
    import torch

    cfg = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    cfg.update(overrides)
    return cfg


def _randomize(module, seed, scale=None):
    """Seeded random weights: torch's default init for each layer type (ComfyUI's layers skip it), or
    N(0, scale^2) for every parameter when a scale is given."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            init = next((c.reset_parameters for c in type(m).__mro__
                         if c.__module__.startswith("torch.nn") and "reset_parameters" in c.__dict__), None)
            if scale is None and init is not None:
                init(m)
        if scale is not None:
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * scale)


def _patcher(base_model):
    import comfy.model_patcher
    import torch

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base_model, load_device=cpu, offload_device=cpu)


def build_sd15():
    """SD1.5's block layout (16 conv proj_out), 32/64/128 wide, context 32."""
    import comfy.supported_models
    import torch

    with torch.inference_mode():  # as ComfyUI loads checkpoints
        model = comfy.supported_models.SD15(_unet_config()).get_model({}, device="cpu")
        _randomize(model, 0)
    return _patcher(model)


def build_sd2_v():
    """SD2.x-v: 16 linear proj_out, v prediction; 64/128/256 wide (SD20 fixes 64 channels per head)."""
    import comfy.model_base
    import comfy.supported_models
    import torch

    cfg = _unet_config(use_linear_in_transformer=True, model_channels=64)
    with torch.inference_mode():
        model = comfy.model_base.BaseModel(comfy.supported_models.SD20(cfg), comfy.model_base.ModelType.V_PREDICTION,
                                           device="cpu")
        _randomize(model, 1)
    return _patcher(model)


SDXL_POOLED = 32


def build_sdxl():
    """SDXL: 11 linear proj_out fed by 2 or 10 transformer blocks each, with the size/pooled ADM input."""
    import comfy.supported_models
    import torch

    cfg = _unet_config(
        num_classes="sequential", adm_in_channels=SDXL_POOLED + 6 * 256, num_res_blocks=[2, 2, 2],
        transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
        use_linear_in_transformer=True, context_dim=64, num_heads=-1, num_head_channels=16,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    )
    with torch.inference_mode():
        model = comfy.supported_models.SDXL(cfg).get_model({}, device="cpu")
        _randomize(model, 2)
    return _patcher(model)


def build_clip(kind="sd1"):
    """A comfy.sd.CLIP with the real tokenizer and a 2-layer, 32-wide random text transformer."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip
    import torch

    name, tokenizer = ("l", comfy.sd1_clip.SD1Tokenizer) if kind == "sd1" else ("h", comfy.text_encoders.sd2_clip.SD2Tokenizer)
    config = {
        "hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 32,
        "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
    }

    class TextModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options or {}, textmodel_json_config=config,
                             special_tokens={"start": 49406, "end": 49407, "pad": 49407 if kind == "sd1" else 0})

    class Clip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options or {}, clip_name=name,
                             clip_model=TextModel)

    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, Clip))
    with torch.inference_mode():
        _randomize(clip.cond_stage_model, 3, scale=0.1)
    return clip


class SDXLTextStandIn:
    """SDXL's real two-encoder tokenizer, with a random embedding table in place of CLIP-L/G (2.5 GB of
    weights): tokenize() and encode_from_tokens_scheduled() as comfy.sd.CLIP has them."""

    def __init__(self):
        import comfy.sdxl_clip
        import torch

        self.tokenizer = comfy.sdxl_clip.SDXLTokenizer()
        self.table = torch.randn(49408, 64, generator=torch.Generator().manual_seed(4))

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        ids = [t[0] for chunk in tokens["l"] for t in chunk]
        cond = self.table[ids][None]
        return [[cond, {"pooled_output": cond.mean(1)[:, :SDXL_POOLED]}]]


def build_vae():
    """A comfy.sd.VAE over a randomly initialised TAESD (8x down, 4 latent channels, as SD's VAE)."""
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    with torch.inference_mode():
        taesd = comfy.taesd.taesd.TAESD()
        _randomize(taesd, 5, scale=0.05)
        return comfy.sd.VAE(sd=dict(taesd.state_dict()))


def run(node, *args, **kwargs):
    """Execute a V3 node as ComfyUI's executor does: under torch.inference_mode(), returning its outputs."""
    import torch

    with torch.inference_mode():
        return node.execute(*args, **kwargs).result


def weights_hash(model) -> str:
    """sha256 over every tensor of a ModelPatcher's model, names included: equal means bit-identical."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in model.model.state_dict().items():
        h.update(name.encode() + t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ksample(model, positive, negative, cfg=4.0, steps=3, size=8, batch=1, seed=0):
    """The stock KSampler's sampling (common_ksampler) on an empty latent, under inference mode as ComfyUI runs it."""
    import torch

    import nodes as comfy_nodes

    latent = {"samples": torch.zeros(batch, 4, size, size)}
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def stock_lora(model, residual, folder, name="r.safetensors"):
    """The residual saved to `folder` and applied by ComfyUI's own LoRA loading (weights merged)."""
    import comfy.sd
    import comfy.utils
    from personalized_residuals.residual_core import fileformat

    path = folder / name
    fileformat.save(residual, str(path))
    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0)[0]


def train(model, clip, vae, images, **overrides):
    """Train Personalized Residual as ComfyUI runs it (every input a list), with small, quick defaults."""
    from personalized_residuals.nodes.train import TrainPersonalizedResidual

    args = {"class_word": "dog", "identifier": "sks", "steps": 4, "learning_rate": 1e-3, "batch_size": 2,
            "rank_fraction": 0.25, "seed": 0, "resolution": 64, "flip": False, "init": "zero", **overrides}
    return run(TrainPersonalizedResidual, model=[model], clip=[clip], vae=[vae], images=images,
               **{k: [v] for k, v in args.items()})


def concept_residual(model, seed=0):
    """A residual with random factors for `model`, made for the concept 'sks dog'."""
    from personalized_residuals.nodes.comfy_model import targets_of
    from personalized_residuals.residual_core import ResidualSet

    residual = ResidualSet.for_targets(targets_of(model), 0.25, "random", seed)
    residual.meta.class_word, residual.meta.identifier = "dog", "sks"
    return residual
