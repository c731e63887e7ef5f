"""Gradient checkpointing for training residuals: trade compute for activation memory.

Only the residuals learn, but gradients still flow back through every UNet block below the first
proj_out, so the forward activations of the whole UNet are kept for the backward pass. With
checkpointing each top-level block (input_blocks[i], middle_block, output_blocks[i]; Flux's double and
single blocks) keeps only its inputs and recomputes its activations (forward hooks included) during
backward: about one extra forward pass per step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.utils.checkpoint
from torch import nn


def _blocks(unet: nn.Module) -> tuple[list[nn.Module], bool]:
    """The top-level blocks, and whether they add to their input in place (ComfyUI's Flux blocks: `x += ...`, which
    would change the input checkpointing keeps, so they run on a copy)."""
    if hasattr(unet, "double_blocks"):  # Flux: every double and single block
        return [*unet.double_blocks, *unet.single_blocks], True
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks], False


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


@contextmanager
def checkpointed(unet: nn.Module):
    """Within the scope, every top-level UNet block recomputes its activations in the backward pass."""
    patched = []
    blocks, in_place = _blocks(unet)
    try:
        for block in blocks:
            previous = block.__dict__.get("forward")  # another patch's instance-level forward, if any
            forward = block.forward

            def on_copies(*args, _forward=forward, **kwargs):  # the kept input stays as it was
                return _forward(*map(_copy, args), **{k: _copy(v) for k, v in kwargs.items()})

            def recompute(*args, _forward=on_copies if in_place else forward, **kwargs):
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            block.forward = recompute
            patched.append((block, previous))
        yield
    finally:
        for block, previous in patched:
            if previous is None:
                del block.forward
            else:
                block.forward = previous
