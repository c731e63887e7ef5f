"""One description per model family: where the residuals go, where each block's attention map over the
prompt's tokens comes from, and which layers a block's mask applies to. The core (hooks.attach, placement
of a ResidualSet's layers) reads a family only through this description, so a new family is a new entry,
not a fork.

SD UNets (SD_UNET): where a layer sits decides what LAG can do with it:
- inside a SpatialTransformer, per spatial position (proj_in, proj_out, and in each transformer block
  attn1.to_q/to_k/to_v/to_out.0, attn2.to_q, attn2.to_out.0, ff.net.*): masked by that block's LAG mask;
- attn2.to_k and attn2.to_v project the prompt's tokens, not positions: no spatial mask can apply;
- outside the SpatialTransformers (ResBlock convs, time embedding, ...): no mask either.
The last two are "unmaskable": with LAG they are applied everywhere ("global") or left out ("skip").

Timing (see hooks.attach): a block's mask comes from its attn2 attention, averaged over the transformer
blocks of its depth. A layer that runs after some of them in a UNet call (attn2.to_out, ff, proj_out,
and every layer of transformer_blocks[j > 0]) takes the mask of the depths seen so far; one that runs
before any (proj_in, and attn1 and attn2.to_q of transformer_blocks[0]) takes the block's mask from the
previous conditional call, and adds nothing before the first.

Flux (FLUX): DiT blocks attend text and image tokens jointly, so a block's map is read from its attention call
(attach installs an attention override; joint_attention.py) and every block's positions are the 2x2 patches
of the call's latent. A residual goes on each double block's image-stream output projection
(double_blocks.i.img_attn.proj) and each single block's linear2, whose tokens are [text; image]: the mask
applies to the image rows; the text rows are unmaskable (applied or left out as such layers are). Layers of a
double block's image stream (img_attn.qkv/proj, img_mlp) and a single block's linear1/linear2 take the block's
mask; the text stream, the modulation layers and everything outside the blocks are unmaskable. Reference
latents (Kontext) follow the image tokens; no mask applies to them. Chroma (CHROMA) has Flux's blocks, so the
same description but for the layers it changes in place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import ResidualError
from .targets import Target, find_targets

_TEXT_LAYER = re.compile(r"transformer_blocks\.\d+\.attn2\.to_[kv]")


def layer_block(path: str, targets: list[Target]) -> tuple | None:
    """The LAG block (a Target's block id) whose mask the layer at `path` takes, or None when no spatial
    mask can apply to it: attn2.to_k/to_v (text tokens) and every layer outside the SpatialTransformers."""
    for t in targets:
        prefix = t.name[: -len("proj_out")]  # "input_blocks.1.1."
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if _TEXT_LAYER.fullmatch(rest):
                return None
            return t.block if rest in ("proj_in", "proj_out") or rest.startswith("transformer_blocks.") else None
    return None


@dataclass(frozen=True)
class AttentionSite:
    """Where one attention over the prompt's tokens is read: the modules whose outputs are its queries
    (per position) and keys (per prompt token), and its number of heads."""

    query: nn.Module
    key: nn.Module
    heads: int


# Which rows of a maskable layer's tokens are its block's positions (see Family.rows).
ALL_ROWS, IMAGE_FIRST, TEXT_THEN_IMAGE = "all", "image first", "text then image"


@dataclass(frozen=True)
class JointAttention:
    """How a DiT with joint text-image attention lays out its positions: `patch` latent pixels a side per image
    token, and the module whose call holds each target block's one attention call."""

    patch: int
    block: Callable[[nn.Module, Target], nn.Module]


@dataclass(frozen=True)
class Family:
    name: str
    targets: Callable[[nn.Module], list[Target]]  # where residuals go (a block each), in forward order
    mask_block: Callable[[str, list[Target]], tuple | None]  # the block whose mask a layer takes; None: unmaskable
    # UNets: each block's maps from hooks on its attention's query and key modules (averaged over the list), its
    # grid from the input [B, C, H, W] of the `grid` module. None for DiTs (`joint`).
    attention: Callable[[nn.Module, Target], list[AttentionSite]] | None = None
    grid: Callable[[nn.Module, Target], nn.Module] | None = None
    joint: JointAttention | None = None
    rows: Callable[[str], str] = lambda path: ALL_ROWS  # which of a maskable layer's token rows are positions
    # Modules whose input the model afterwards adds to in place (ComfyUI's Flux: `txt += ...`, `x += ...`): autograd
    # would find the input it saved for backward changed, so training hands them a copy (train.py).
    changed_in_place: Callable[[nn.Module], list[nn.Module]] = lambda model: []


def _submodule(root: nn.Module, path: str) -> nn.Module:
    """root.get_submodule(path), several times faster (hundreds of lookups per UNet call with a LoRA)."""
    for part in path.split("."):
        root = root._modules[part]
    return root


def _spatial_transformer(unet: nn.Module, target: Target) -> nn.Module:
    return _submodule(unet, target.name.rsplit(".", 1)[0])


def _cross_attention(unet: nn.Module, target: Target) -> list[AttentionSite]:
    return [AttentionSite(b.attn2.to_q, b.attn2.to_k, b.attn2.heads)
            for b in _spatial_transformer(unet, target).transformer_blocks]


# SD1.x, SD2.x, SDXL: a residual on each SpatialTransformer's proj_out; its map from the cross-attention of
# each of its transformer blocks (SDXL: 2 or 10).
SD_UNET = Family("SD1.x, SD2.x and SDXL", find_targets, layer_block, _cross_attention, _spatial_transformer)


# ---------------------------------------------------------------- Flux

_FLUX_IMAGE = re.compile(r"double_blocks\.(\d+)\.(img_attn\.(qkv|proj)|img_mlp\.\d+)")
_FLUX_JOINED = re.compile(r"single_blocks\.(\d+)\.linear[12]")


def flux_targets(dit: nn.Module) -> list[Target]:
    """Each double block's img_attn.proj, then each single block's linear2 (Flux.1: 19 + 38)."""
    layers = [(f"double_blocks.{i}.img_attn.proj", ("double", i), b.img_attn.proj)
              for i, b in enumerate(getattr(dit, "double_blocks", []))]
    layers += [(f"single_blocks.{i}.linear2", ("single", i), b.linear2)
               for i, b in enumerate(getattr(dit, "single_blocks", []))]
    if not layers:
        raise ResidualError("This model has no Flux double or single blocks; LAG for Flux needs a Flux model.")
    return [Target(name, block, False, m.weight.shape[0], m.weight.shape[1], 1) for name, block, m in layers]


def flux_mask_block(path: str, targets: list[Target]) -> tuple | None:
    image = _FLUX_IMAGE.fullmatch(path)
    if image:
        return ("double", int(image.group(1)))
    joined = _FLUX_JOINED.fullmatch(path)
    return ("single", int(joined.group(1))) if joined else None


def _flux_rows(path: str) -> str:
    return TEXT_THEN_IMAGE if path.startswith("single_blocks.") else IMAGE_FIRST


def _flux_block(dit: nn.Module, target: Target) -> nn.Module:
    kind, i = target.block
    return (dit.double_blocks if kind == "double" else dit.single_blocks)[i]


def _flux_norms_before_in_place_adds(dit: nn.Module) -> list[nn.Module]:
    return [*(n for b in dit.double_blocks for n in (b.txt_norm1, b.txt_norm2)), *(b.pre_norm for b in dit.single_blocks)]


FLUX = Family("Flux.1", flux_targets, flux_mask_block, joint=JointAttention(2, _flux_block), rows=_flux_rows,
              changed_in_place=_flux_norms_before_in_place_adds)


def _chroma_norms_before_in_place_adds(dit: nn.Module) -> list[nn.Module]:
    return [*(n for b in dit.double_blocks for n in (b.img_norm1, b.img_norm2, b.txt_norm1, b.txt_norm2)),
            *(b.pre_norm for b in dit.single_blocks)]


# Chroma: Flux.1 schnell's blocks without their modulation layers (one small network makes every block's
# modulation), T5 alone as its text encoder; it adds to the image stream in place too.
CHROMA = Family("Chroma", flux_targets, flux_mask_block, joint=JointAttention(2, _flux_block), rows=_flux_rows,
                changed_in_place=_chroma_norms_before_in_place_adds)
