"""LAG for any LoRA: low-rank deltas on Linear and 1x1-conv layers anywhere in a UNet, keyed by module path.

Where a layer sits decides what LAG can do with it:
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
import weakref

import torch
from torch import nn

from .errors import ResidualError
from .residual import LowRankResidual
from .targets import Target

UNMASKABLE = ("global", "skip")
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


def low_rank(up: torch.Tensor, down: torch.Tensor, alpha: float | None = None, conv: bool | None = None) -> LowRankResidual:
    """A LoRA layer's factors as a LowRankResidual: up [out, r(, 1, 1)], down [r, in(, 1, 1)], scale alpha / r
    (1 without alpha, as ComfyUI reads such files). conv: whether the layer is a 1x1 conv (default: whether
    the factors are 4-D; some tools save 2-D factors for 1x1 convs)."""
    kernels = [t.shape[2:] for t in (up, down) if t.ndim == 4]
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or any(k != (1, 1) for k in kernels) or up.shape[1] != down.shape[0]:
        raise ResidualError(f"Only the factors of linear and 1x1-conv LoRA layers can be masked, got up {list(up.shape)} "
                            f"and down {list(down.shape)}.")
    rank = down.shape[0]
    layer = LowRankResidual(up.shape[0], down.shape[1], rank, down.ndim == 4 if conv is None else conv,
                            alpha=rank if alpha is None else alpha)
    with torch.no_grad():
        layer.up.copy_(up.reshape(up.shape[0], rank))
        layer.down.copy_(down.reshape(rank, down.shape[1]))
    return layer


class LoraLayers:
    """A LoRA's layers as low-rank deltas on any Linear or 1x1-conv module of a UNet, keyed by module path
    inside the UNet ("input_blocks.1.1.transformer_blocks.0.attn1.to_q"). attach() adds each one to its
    module's output; with LAG, the layers a spatial mask can apply to are masked by their block's mask and
    the others are applied everywhere (unmaskable="global") or left out ("skip"). Without LAG every layer
    applies everywhere: the LoRA as a weight merge would give it, up to float rounding."""

    def __init__(self, layers: dict[str, LowRankResidual], unmaskable: str = "global"):
        if unmaskable not in UNMASKABLE:
            raise ResidualError(f"unmaskable must be one of {UNMASKABLE}, got {unmaskable!r}.")
        self.layers, self.unmaskable = dict(layers), unmaskable
        self._placements: dict[tuple[int, bool], tuple[weakref.ref, dict]] = {}  # per UNet: worked out once

    def check_fits(self, unet: nn.Module) -> None:
        """Raise a ResidualError naming the layer when a path is not in `unet` or its shape differs."""
        for path, layer in self.layers.items():
            try:
                weight = unet.get_submodule(path).weight
            except AttributeError:
                raise ResidualError(f"This LoRA has a layer {path} that the model lacks: it was made for another "
                                    "model. Use a LoRA made for this model's family.") from None
            ours = (layer.up.shape[0], layer.down.shape[1], "1x1 conv" if layer.conv else "linear")
            kind = "linear" if weight.ndim == 2 else "1x1 conv" if weight.shape[2:] == (1, 1) else "conv"
            if ours != (weight.shape[0], weight.shape[1], kind):
                raise ResidualError(f"This LoRA's layer {path} is {ours[0]}x{ours[1]} ({ours[2]}), the model's is "
                                    f"{weight.shape[0]}x{weight.shape[1]} ({kind}): it was made for another model. "
                                    "Use a LoRA made for this model's family.")

    def placement(self, unet: nn.Module, targets: list[Target], lagged: bool) -> dict[str, tuple[LowRankResidual, tuple | None]]:
        """Module path -> (layer, the block whose mask it takes or None for everywhere), as attach() applies it.
        Worked out on the first call for a UNet (hundreds of layers: not on every UNet call)."""
        cached = self._placements.get((id(unet), lagged))
        if cached is not None and cached[0]() is unet:
            return cached[1]
        self.check_fits(unet)
        out = {}
        for path, layer in self.layers.items():
            block = layer_block(path, targets)
            if block is None and lagged and self.unmaskable == "skip":
                continue
            out[path] = (layer, block)
        self._placements[(id(unet), lagged)] = (weakref.ref(unet), out)
        return out

    def forget_casts(self) -> None:
        for layer in self.layers.values():
            layer.forget_cast()
