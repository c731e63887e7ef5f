"""ComfyUI imported in-process, and models built through its own SD1.5 / SD2 / SDXL classes with random
weights: for tier-2 tests (small widths, so they run on a CPU in seconds, with the real block layout and so
every proj_out key) and for benchmarks (full widths).

ComfyUI is found at $COMFYUI_PATH (default ~/ComfyUI); it is never vendored into the pack.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

COMFY = Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()


def bootstrap(device_args: tuple[str, ...] = ("--cpu",)) -> str | None:
    """Import ComfyUI as `main.py --cpu` would (once per process); return why it can't, or None."""
    if not (COMFY / "main.py").is_file():
        return f"no ComfyUI at {COMFY} (set COMFYUI_PATH to a ComfyUI checkout)"
    sys.path.insert(0, str(COMFY))
    if "comfy.cli_args" in sys.modules:
        return None
    argv, sys.argv = sys.argv, [str(COMFY / "main.py"), *device_args]
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
        return f"ComfyUI at {COMFY} does not import with this Python ({e}); use its venv (tests/run.sh does)"
    finally:
        sys.argv = argv
    return None


# ---------------------------------------------------------------- models through ComfyUI's own classes

def unet_config(**overrides):
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


def randomize(module, seed, scale=None):
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


def patcher(base_model, device: str = "cpu"):
    import comfy.model_patcher
    import torch

    return comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device(device), offload_device=torch.device("cpu"))


def build_sd15(width: int = 32, context_dim: int = 32, device: str = "cpu"):
    """SD1.5's block layout (16 conv proj_out); widths width x (1, 2, 4, 4) (SD1.5 itself: 320, context 768)."""
    import comfy.supported_models
    import torch

    with torch.inference_mode():  # as ComfyUI loads checkpoints
        config = comfy.supported_models.SD15(unet_config(model_channels=width, context_dim=context_dim))
        model = config.get_model({}, device=device)
        randomize(model, 0)
    return patcher(model, device)


def build_sd2_v():
    """SD2.x-v: 16 linear proj_out, v prediction; 64/128/256 wide (SD20 fixes 64 channels per head)."""
    import comfy.model_base
    import comfy.supported_models
    import torch

    cfg = unet_config(use_linear_in_transformer=True, model_channels=64)
    with torch.inference_mode():
        model = comfy.model_base.BaseModel(comfy.supported_models.SD20(cfg), comfy.model_base.ModelType.V_PREDICTION,
                                           device="cpu")
        randomize(model, 1)
    return patcher(model)


SDXL_POOLED = 32


def build_sdxl():
    """SDXL: 11 linear proj_out fed by 2 or 10 transformer blocks each, with the size/pooled ADM input."""
    import comfy.supported_models
    import torch

    cfg = unet_config(
        num_classes="sequential", adm_in_channels=SDXL_POOLED + 6 * 256, num_res_blocks=[2, 2, 2],
        transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
        use_linear_in_transformer=True, context_dim=64, num_heads=-1, num_head_channels=16,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    )
    with torch.inference_mode():
        model = comfy.supported_models.SDXL(cfg).get_model({}, device="cpu")
        randomize(model, 2)
    return patcher(model)



def build_flux(hidden: int = 64, heads: int = 4, depth: int = 2, single: int = 2, context_dim: int = 32,
               vec_dim: int = 32):
    """Flux.1 [dev]'s layout (double blocks, then single blocks, guidance input, 2x2 patches over 16 latent
    channels) through ComfyUI's own Flux classes, `hidden` wide (dev: 3072, 24 heads, 19 + 38 blocks, T5 4096)."""
    import comfy.supported_models
    import torch

    head = hidden // heads
    axes = [head // 4, 3 * head // 8, 3 * head // 8]  # RoPE's axes, each even (dev: 16, 56, 56 of 128; here 4, 6, 6)
    config = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
              "vec_in_dim": vec_dim, "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": 4.0,
              "num_heads": heads, "depth": depth, "depth_single_blocks": single, "axes_dim": axes, "theta": 10000,
              "qkv_bias": True}
    with torch.inference_mode():
        model = comfy.supported_models.Flux(config).get_model({}, device="cpu")
        randomize(model, 3)
        for name, p in model.named_parameters():  # QK RMSNorm scales: no torch init to run, ones as trained models start
            if name.endswith(".scale"):
                p.fill_(1.0)
    return patcher(model)


def build_chroma(hidden: int = 64, heads: int = 4, depth: int = 2, single: int = 2, context_dim: int = 32):
    """Chroma's layout (Flux.1's double and single blocks, no modulation layers: one approximator network makes
    them; 2x2 patches over 16 latent channels) through ComfyUI's own Chroma classes, `hidden` wide."""
    import comfy.supported_models
    import torch

    head = hidden // heads
    config = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
              "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
              "depth": depth, "depth_single_blocks": single, "axes_dim": [head // 4, 3 * head // 8, 3 * head // 8],
              "theta": 10000, "qkv_bias": True, "in_dim": 64, "out_dim": hidden, "hidden_dim": 2 * hidden, "n_layers": 2}
    with torch.inference_mode():
        model = comfy.supported_models.Chroma(config).get_model({}, device="cpu")
        randomize(model, 3)
        for name, p in model.named_parameters():  # RMSNorm scales: ones, as trained models start
            if name.endswith(".scale"):
                p.fill_(1.0)
    return patcher(model)


def build_clip(kind="sd1", width: int = 32):
    """A comfy.sd.CLIP with the real tokenizer and a 2-layer random text transformer `width` wide."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip
    import torch

    name, tokenizer = ("l", comfy.sd1_clip.SD1Tokenizer) if kind == "sd1" else ("h", comfy.text_encoders.sd2_clip.SD2Tokenizer)
    config = {
        "hidden_act": "quick_gelu", "hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
        "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": width,
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
        randomize(clip.cond_stage_model, 3, scale=0.1)
    return clip


def build_flux_clip(width: int = 32):
    """Flux's comfy.sd.CLIP: its real FluxTokenizer (CLIP-L's 77-token chunks, and T5-XXL's sentencepiece
    tokens, one chunk padded to 256) and ComfyUI's own FluxClipModel with both encoders shrunk to 2 layers
    `width` wide through ComfyUI's per-encoder config overrides ("<model_name>_model_config"), random weights.
    Its conditioning is Flux's: a [1, T, width] T5 context (T = 256 for a short prompt; build_flux(context_dim=
    width) reads it) with CLIP-L's pooled vector, `width` wide, as "pooled_output" (build_flux's vec_dim)."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import torch

    heads = 2
    clip_l = {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": heads,
              "num_hidden_layers": 2, "projection_dim": width}
    t5 = {"d_model": width, "d_kv": width // heads, "num_heads": heads, "d_ff": 2 * width, "num_layers": 2}  # vocab: T5's 32128
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                    comfy.text_encoders.flux.flux_clip())
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": clip_l, "t5xxl_model_config": t5})
    with torch.inference_mode():
        randomize(clip.cond_stage_model, 6, scale=0.1)
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


def build_vae(channels: int = 4):
    """A comfy.sd.VAE over a randomly initialised TAESD (8x down; 4 latent channels as SD's VAE, 16 as Flux's)."""
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    with torch.inference_mode():
        taesd = comfy.taesd.taesd.TAESD(latent_channels=channels)
        randomize(taesd, 5, scale=0.05)
        return comfy.sd.VAE(sd=dict(taesd.state_dict()))
