"""Attention-guided training (Break-A-Scene's cross-attention loss): while a residual trains, the concept's
words are asked to attend inside the subject's mask, so that LAG's masks at sampling time fall on the subject.

In every SpatialTransformer (read through a Family, as hooks.attach reads it) the cross-attention map of the
concept's tokens (token_attention: softmax over the prompt's tokens, summed over the identifier's and class
word's positions, mean over heads; averaged over the block's transformer blocks) is taken with its graph,
divided by its per-row maximum (to 0-1), and compared by MSE with the row's subject mask averaged onto the
block's grid; the blocks' losses are averaged and times `weight` added to the diffusion loss (fit's
attention_loss). Residuals sit only on proj_out, so the loss reaches them only through the queries of later
blocks (the first block's map does not depend on any residual).

Measured in the evaluation world (bench/attention_training.py -> bench/results/attention_training.md; 3
concepts x 3 seeds, against the masked loss alone): it does not pay. At weight 0.1 (the sweep's pick: 1
halved LAG identity, 0.01 barely moves the maps) the words' attention moves little toward the subject (the
probe's MSE 0.380 -> 0.359); LAG identity stays (0.235 -> 0.236) while global identity rises (0.246 -> 0.283),
so LAG loses more against global (2% -> 16%); pairs with LAG warmup bleed no less (0.429 -> 0.441) and draw
both objects less often (0.396 -> 0.292). Kept as an option of fit/train_residual, off by default.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ResidualError
from .family import SD_UNET, Family
from .lag import token_attention


def map_loss(maps: torch.Tensor, grid: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
    """maps [B, h*w] (attention, >= 0) on `grid` (h, w), mask [B, 1, H, W] in 0-1 -> the MSE between each
    map divided by its maximum and the mask averaged onto the grid (area)."""
    h, w = grid
    target = F.interpolate(mask.float(), size=(h, w), mode="area").flatten(1)
    peak = maps.amax(-1, keepdim=True).clamp_min(1e-12)
    return F.mse_loss(maps / peak, target)


class AttentionLoss:
    """The attention loss on `unet` for the concept's token positions in the training caption (e.g.
    tokens.locate_concept(...).positions), times `weight`. Use: `with loss.recording(): out = unet(...)`,
    then `loss(mask)`: the weighted loss of that call's maps against the rows' masks [B, 1, H, W]."""

    def __init__(self, unet: nn.Module, positions: list[int], weight: float = 0.01, family: Family = SD_UNET):
        if not positions:
            raise ResidualError("attention loss: no token positions for the concept.")
        if family.attention is None or family.grid is None:
            raise ResidualError(f"attention loss: {family.name} has no cross-attention sites (UNets only).")
        self.unet, self.weight, self.family = unet, float(weight), family
        self.positions = torch.as_tensor(positions, dtype=torch.long)
        self.targets = family.targets(unet)
        self._maps: dict[tuple, list[torch.Tensor]] = {}
        self._grids: dict[tuple, tuple[int, int]] = {}

    @contextmanager
    def recording(self):
        """Within the scope, every block's cross-attention maps of the concept's tokens are kept, with grad."""
        self._maps, self._grids = {}, {}
        handles = []
        pending: dict[tuple, torch.Tensor] = {}

        def grid_hook(block):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["x"]
                self._grids[block] = (x.shape[2], x.shape[3])
            return hook

        def q_hook(key):
            def hook(module, args, q):
                pending[key] = q
            return hook

        def k_hook(key, block, heads):
            def hook(module, args, k):
                q = pending.pop(key)
                positions = self.positions.to(q.device)
                self._maps.setdefault(block, []).append(token_attention(q, k, heads, positions))
            return hook

        try:
            for t in self.targets:
                handles.append(self.family.grid(self.unet, t).register_forward_pre_hook(grid_hook(t.block),
                                                                                         with_kwargs=True))
                for i, site in enumerate(self.family.attention(self.unet, t)):
                    handles.append(site.query.register_forward_hook(q_hook((t.block, i))))
                    handles.append(site.key.register_forward_hook(k_hook((t.block, i), t.block, site.heads)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def __call__(self, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            raise ResidualError("attention loss: it needs subject masks (one per photo).")
        if not self._maps:
            raise ResidualError("attention loss: no attention maps were recorded (call the model inside recording()).")
        losses = [map_loss(torch.stack(maps).mean(0), self._grids[block], mask.to(maps[0].device))
                  for block, maps in self._maps.items()]
        self._maps = {}
        return self.weight * torch.stack(losses).mean()
