"""How residuals enter a UNet: forward hooks, attached for a scope and removed after it.

Hooks add `strength * M * (dW x)` to each proj_out's output (summed over concepts when there are
several) instead of replacing modules or weights,
so weight patches on the same layer (a stock LoRA), attention patches and offloading keep working, and
the UNet is exactly as before once the scope ends. Training, LAG sampling and global sampling all go
through attach().
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .lag import LagSession, resolve_overlaps
from .residual import ResidualSet
from .targets import Target, find_targets


@dataclass
class Concept:
    """One residual on a UNet: applied everywhere, or (with a LagSession) where its words attend."""

    residual: ResidualSet
    strength: float = 1.0
    lag: LagSession | None = None


def _proj_out_hook(target: Target, concepts: list[Concept]):
    layers = [c.residual.layers[target.key] for c in concepts]
    lagged = [i for i, c in enumerate(concepts) if c.lag is not None]

    def hook(module, args, out):
        x = args[0]
        masks = {}
        if lagged:
            if target.conv:  # x: [B, C, H, W]
                b, _, h, w = x.shape
                shape, tokens = (b, 1, h, w), h * w
            else:  # x: [B, H*W, C]
                b, tokens, _ = x.shape
                shape = (b, tokens, 1)
            weights = [concepts[i].lag.weights(target.block, b, tokens, x.device) for i in lagged]
            resolved = resolve_overlaps([w[0] for w in weights], [w[1] for w in weights])
            for i, mask, (_, score) in zip(lagged, resolved, weights, strict=True):
                concepts[i].lag.applied(target.block, mask, score)
                masks[i] = mask.view(shape)
        for i, (concept, layer) in enumerate(zip(concepts, layers, strict=True)):
            delta = layer.delta(x)
            if i in masks:
                delta = delta * masks[i].to(delta.dtype)
            out = out + (delta * concept.strength if concept.strength != 1.0 else delta)
        return out

    return hook


def _attention_hooks(block: tuple, heads: int, sessions: list[LagSession]):
    """Hooks on a transformer block's cross-attention projections that hand q and k to every session
    (they return None: the projections' outputs are left as they are)."""

    def q_hook(module, args, q):
        for s in sessions:
            s.record_q(block, q)

    def k_hook(module, args, k):
        for s in sessions:
            s.record_k(block, k, heads)

    return q_hook, k_hook


@contextmanager
def attach(
    unet: nn.Module,
    residual: ResidualSet | list[Concept],
    strength: float = 1.0,
    lag: LagSession | None = None,
    cond_or_uncond: list[int] | None = None,
    targets: list[Target] | None = None,
):
    """Within the scope, every proj_out of `unet` adds its residual (masked by `lag` when given).

    `residual` may also be a list of Concepts (then strength and lag are theirs): several concepts in one
    image, each masked by its own words; where LAG masks overlap, the concept that attends most wins.
    cond_or_uncond: how the batch splits into conditional (0) and unconditional (1) chunks, for LAG;
    None means every row is conditional. One scope per UNet call when the split changes per call.
    """
    concepts = residual if isinstance(residual, list) else [Concept(residual, strength, lag)]
    targets = targets if targets is not None else find_targets(unet)
    for concept in concepts:
        concept.residual.check_fits(targets)
        if concept.lag is not None:
            concept.lag.begin_call(cond_or_uncond)
    sessions = [c.lag for c in concepts if c.lag is not None]
    handles = []
    try:
        for t in targets:
            handles.append(unet.get_submodule(t.name).register_forward_hook(_proj_out_hook(t, concepts)))
            if not sessions:
                continue
            transformer = unet.get_submodule(t.name.rsplit(".", 1)[0])
            for block in transformer.transformer_blocks:
                q_hook, k_hook = _attention_hooks(t.block, block.attn2.heads, sessions)
                handles.append(block.attn2.to_q.register_forward_hook(q_hook))
                handles.append(block.attn2.to_k.register_forward_hook(k_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen(module: nn.Module):
    """Freeze `module` for training something attached to it, and let autograd flow through it.

    Every parameter stops requiring grad (no weight-gradient work, no .grad left behind). Weights made
    under torch.inference_mode() (ComfyUI loads checkpoints that way) "cannot be saved for backward":
    each is swapped for a normal tensor over the same storage (no copy, no extra memory). Everything is
    put back as it was when the scope ends. Call outside inference mode.
    """
    swapped, thawed = [], []
    try:
        for mod in module.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    if t.is_inference():
                        alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                            t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
                        store[name] = nn.Parameter(alias, requires_grad=False) if store is mod._parameters else alias
                        swapped.append((store, name, t))
                    elif t.requires_grad:
                        t.requires_grad_(False)
                        thawed.append(t)
        yield
    finally:
        for t in thawed:
            t.requires_grad_(True)
        for store, name, t in reversed(swapped):
            store[name] = t
