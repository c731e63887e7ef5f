"""Concept photos -> one training batch: RGB, resized and centre-cropped to a square."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ResidualError


def square_batch(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """images: channels-last float tensors in [0, 1], each [H, W, C] or a batch [B, H, W, C], of any sizes.

    Returns [N, size, size, 3]: the shorter side scaled to `size` (antialiased), the centre kept.
    Grayscale is repeated to RGB; an alpha channel is dropped.
    """
    frames = [f for img in images for f in (img if img.ndim == 4 else img[None])]
    if not frames:
        raise ResidualError("No concept photos: connect an IMAGE with 1 or more photos of the concept (4-6 is typical).")
    out = []
    for i, f in enumerate(frames):
        if f.ndim != 3 or f.shape[-1] not in (1, 3, 4):
            raise ResidualError(f"Photo {i} has shape {tuple(f.shape)}; expected [height, width, 1, 3 or 4 channels].")
        f = f[..., :3] if f.shape[-1] == 4 else f.expand(-1, -1, 3)
        x = f.movedim(-1, 0)[None].float()
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(x[0, :, top:top + size, left:left + size].movedim(0, -1).clamp(0, 1))
    return torch.stack(out)
