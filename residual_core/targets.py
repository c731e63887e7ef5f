"""Where residuals go: the output projection of every transformer block of an SD-style UNet."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ResidualError

# The parts of an LDM UNet that hold SpatialTransformers, in forward order, with the name
# ComfyUI's transformer_options use for each (("input", 1), ("middle", 0), ("output", 3), ...).
_PARTS = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


@dataclass(frozen=True)
class Target:
    """One proj_out layer that receives a residual."""

    name: str  # module path inside the UNet, e.g. "input_blocks.1.1.proj_out"
    block: tuple[str, int]  # ComfyUI's block id, e.g. ("input", 1)
    conv: bool  # 1x1 Conv2d (SD1.x) or Linear (SD2.x, SDXL)
    out_dim: int
    in_dim: int
    depth: int  # transformer blocks feeding this proj_out (SDXL: 2 or 10)


def find_targets(unet: nn.Module) -> list[Target]:
    """Every SpatialTransformer's proj_out in forward order (16 in SD1.x/SD2.x, 11 in SDXL)."""
    targets = []
    for name, module in unet.named_modules():
        if not (hasattr(module, "transformer_blocks") and hasattr(module, "proj_out")):
            continue
        parts = name.split(".")
        if parts[0] not in _PARTS:
            continue
        index = int(parts[1]) if parts[0] != "middle_block" else 0
        weight = module.proj_out.weight
        targets.append(
            Target(
                name=f"{name}.proj_out",
                block=(_PARTS[parts[0]], index),
                conv=weight.ndim == 4,
                out_dim=weight.shape[0],
                in_dim=weight.shape[1],
                depth=len(module.transformer_blocks),
            )
        )
    if not targets:
        raise ResidualError(
            "This model has no transformer blocks with a proj_out layer. Personalized residuals need an "
            "SD1.x, SD2.x or SDXL UNet; load one with a stock checkpoint loader."
        )
    return targets


def model_family(targets: list[Target]) -> str:
    """A short name for the UNet family the targets come from, written into residual files."""
    return family_name([t.name for t in targets], {t.out_dim for t in targets}, targets[0].conv)


def family_name(paths: list[str], dims: set[int], conv: bool) -> str:
    """The family name from the residual layers' layout: their paths (how many, SD's proj_out or Flux's blocks),
    their widths, conv or linear."""
    dims, layers = sorted(dims), len(paths)
    if paths[0].startswith(("double_blocks.", "single_blocks.")):
        doubles = sum(p.startswith("double_blocks.") for p in paths)
        return "flux" if (doubles, layers - doubles, dims) == (19, 38, [3072]) else \
            f"custom-flux-{doubles}+{layers - doubles}x{'-'.join(map(str, dims))}"
    if layers == 16 and dims == [320, 640, 1280]:
        return "sd1" if conv else "sd2"
    if layers == 11 and dims == [640, 1280] and not conv:
        return "sdxl"
    return f"custom-{layers}x{'-'.join(map(str, dims))}-{'conv' if conv else 'linear'}"


def family_label(family: str) -> str:
    """The name users know a family by, for messages."""
    if family.startswith("custom-flux"):
        return "a custom Flux"
    return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "flux": "Flux.1"}.get(family, "a custom UNet")


def weights_hash(weights: list[torch.Tensor]) -> str:
    """A short fingerprint of the base model's proj_out weights (as fp16, so fp32 and fp16 loads agree)."""
    h = hashlib.sha256()
    for w in weights:
        h.update(w.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
