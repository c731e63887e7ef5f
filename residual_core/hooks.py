"""How residuals enter a UNet: forward hooks, attached for a scope and removed after it.

Hooks add `strength * M * (dW x)` to each proj_out's output instead of replacing modules or weights,
so weight patches on the same layer (a stock LoRA), attention patches and offloading keep working, and
the UNet is exactly as before once the scope ends. Training, LAG sampling and global sampling all go
through attach().
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .lag import LagSession
from .residual import LowRankResidual, ResidualSet
from .targets import Target, find_targets


def _proj_out_hook(target: Target, layer: LowRankResidual, strength: float, lag: LagSession | None):
    def hook(module, args, out):
        x = args[0]
        delta = layer.delta(x)
        if lag is not None:
            if target.conv:  # x: [B, C, H, W]
                b, _, h, w = x.shape
                mask = lag.mask(target.block, b, h * w, x.device).view(b, 1, h, w)
            else:  # x: [B, H*W, C]
                b, n, _ = x.shape
                mask = lag.mask(target.block, b, n, x.device).unsqueeze(-1)
            delta = delta * mask.to(delta.dtype)
        return out + delta * strength if strength != 1.0 else out + delta

    return hook


@contextmanager
def attach(
    unet: nn.Module,
    residual: ResidualSet,
    strength: float = 1.0,
    lag: LagSession | None = None,
    cond_or_uncond: list[int] | None = None,
    targets: list[Target] | None = None,
):
    """Within the scope, every proj_out of `unet` adds its residual (masked by `lag` when given).

    cond_or_uncond: how the batch splits into conditional (0) and unconditional (1) chunks, for LAG;
    None means every row is conditional. One scope per UNet call when the split changes per call.
    """
    targets = targets if targets is not None else find_targets(unet)
    residual.check_fits(targets)
    if lag is not None:
        lag.begin_call(cond_or_uncond)
    handles = []
    try:
        for t in targets:
            handles.append(unet.get_submodule(t.name).register_forward_hook(
                _proj_out_hook(t, residual.layers[t.key], strength, lag)))
            if lag is None:
                continue
            transformer = unet.get_submodule(t.name.rsplit(".", 1)[0])
            for block in transformer.transformer_blocks:
                attn = block.attn2
                handles.append(attn.to_q.register_forward_hook(
                    lambda m, a, q, key=t.block: lag.record_q(key, q)))
                handles.append(attn.to_k.register_forward_hook(
                    lambda m, a, k, key=t.block, heads=attn.heads: lag.record_k(key, k, heads)))
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
