"""Flux.1's files with random weights, at the shapes the stock loaders need, for the end-to-end tests.

ComfyUI's loaders build their models from fixed configs, so nothing here can be small: Load Diffusion Model
detects Flux.1 at 3072 wide (only the number of blocks is read from the file: one double and one single block
here, 545M parameters), DualCLIPLoader of type flux builds the full CLIP-L and the full T5-XXL (4.7B
parameters), Load VAE Flux's 16-channel VAE. Names and shapes come from ComfyUI's own classes on the meta
device; values follow sd15_checkpoint.py's recipe. T5-XXL is stored as fp8 e4m3fn, as the widely used
t5xxl_fp8_e4m3fn.safetensors is (4.8 GB; ComfyUI computes it in float32 either way), the transformer as bf16,
as flux1-dev is. Files are written a tensor at a time, so writing one never holds it whole in memory, and
cached beside the SD1.5 checkpoint (sd15_checkpoint.cache_dir(); CI starts that folder empty).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

from sd15_checkpoint import cache_dir, random_tensor

LAYOUT_VERSION = 1  # bump when a recipe below changes, so stale cached files are not reused
DEPTH, SINGLE = 1, 1  # Flux.1's blocks kept: one of each kind, as LAG reads and patches both
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3"}


def flux_shapes() -> dict:
    """{name: shape} of a flux1-dev-layout transformer file (its own names, no prefix) with DEPTH + SINGLE blocks."""
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops
    import torch

    keys = {"img_in.weight": (3072, 64), "vector_in.in_layer.weight": (3072, 768),
            "guidance_in.in_layer.weight": (3072, 256)}
    keys |= {f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(DEPTH)}
    keys |= {f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(SINGLE)}
    config = comfy.model_detection.detect_unet_config({k: torch.empty(s, device="meta") for k, s in keys.items()}, "")
    assert config.pop("image_model") == "flux", config
    model = comfy.ldm.flux.model.Flux(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def clip_l_shapes() -> dict:
    import comfy.sd1_clip
    import torch

    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in comfy.sd1_clip.SDClipModel().transformer.state_dict().items()}


def t5xxl_shapes() -> dict:
    import comfy.text_encoders.sd3_clip
    import torch

    with torch.device("meta"):
        model = comfy.text_encoders.sd3_clip.T5XXLModel(device="meta")
        return {n: tuple(t.shape) for n, t in model.transformer.state_dict().items()}


def vae_shapes() -> dict:
    """Flux's VAE (ae.safetensors): SD's VAE layout with 16 latent channels and no quant convs."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    return {n: tuple(t.shape) for n, t in vae.state_dict().items()}


def write_streamed(path: Path, shapes: dict, dtype, make) -> None:
    """A safetensors file of `shapes` in `dtype`, each tensor `make(name, shape)`, written one at a time."""
    import numpy as np
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in sorted(shapes.items()):
        nbytes = size * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-aligned
    partial = path.with_suffix(f".partial{os.getpid()}")
    with open(partial, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, shape in sorted(shapes.items()):
            f.write(make(name, shape).to(dtype).reshape(-1).view(torch.uint8).numpy())
    partial.replace(path)  # atomic: a concurrent or interrupted run never sees half a file


def random_file(stem: str, shapes: dict, dtype, seed: int) -> Path:
    """The cached random-weights file `stem`, written first if absent."""
    import torch

    path = cache_dir() / f"{stem}-random-v{LAYOUT_VERSION}-seed{seed}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed)
        write_streamed(path, shapes, dtype, lambda name, shape: random_tensor(name, shape, generator))
    return path


def write_flux_lora(path: Path, shapes: dict, select, rank: int = 2, scale: float = 0.3) -> None:
    """A random kohya-named Flux LoRA (lora_unet_double_blocks_0_img_attn_proj, ...) on every matrix of `shapes`
    whose layer path `select`s; each layer's factors depend on its name only."""
    import torch

    factors = {}
    for key, shape in shapes.items():
        layer = key.removesuffix(".weight")
        if not key.endswith(".weight") or len(shape) != 2 or not select(layer):
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        name = "lora_unet_" + layer.replace(".", "_")
        factors[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=g) * scale
        factors[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], generator=g) * scale
        factors[f"{name}.alpha"] = torch.tensor(float(rank))
    write_streamed(path, {k: tuple(v.shape) for k, v in factors.items()}, torch.float32, lambda name, _: factors[name])


def flux_files() -> dict:
    """{loader input name: cached file} of the four files a Flux workflow's three loaders read (DualCLIPLoader's
    clip_name2 is an fp8 T5-XXL)."""
    import torch

    return {"unet_name": random_file("flux1-dev-1+1-blocks", flux_shapes(), torch.bfloat16, seed=0),
            "clip_name1": random_file("clip_l", clip_l_shapes(), torch.float16, seed=1),
            "clip_name2": random_file("t5xxl_fp8_e4m3fn", t5xxl_shapes(), torch.float8_e4m3fn, seed=2),
            "vae_name": random_file("flux-ae", vae_shapes(), torch.float16, seed=3)}


class BackgroundWriter:
    """flux_files() in another process: the files take a minute and a half on one core, which the tests before
    the Flux ones (one thread each, or a server's) leave idle."""

    def __init__(self, log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, __file__], stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def files(self) -> dict:
        """flux_files(), once the writer is done (so from its cache)."""
        if self.process.wait() != 0:
            raise RuntimeError(f"writing Flux's files failed:\n{self.log.read_text(errors='replace')[-3000:]}")
        return flux_files()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":  # BackgroundWriter's process
    from comfyui_models import bootstrap

    problem = bootstrap()
    if problem:
        sys.exit(problem)
    flux_files()
