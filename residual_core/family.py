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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

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


@dataclass(frozen=True)
class Family:
    name: str
    targets: Callable[[nn.Module], list[Target]]  # where residuals go (a block each), in forward order
    attention: Callable[[nn.Module, Target], list[AttentionSite]]  # the block's maps, averaged over the list
    grid: Callable[[nn.Module, Target], nn.Module]  # the module whose input [B, C, H, W] lays out the positions
    mask_block: Callable[[str, list[Target]], tuple | None]  # the block whose mask a layer takes; None: unmaskable


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
SD_UNET = Family("SD1.x / SD2.x / SDXL UNet", find_targets, _cross_attention, _spatial_transformer, layer_block)
