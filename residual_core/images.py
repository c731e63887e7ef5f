"""Concept photos -> one training batch: RGB, resized and centre-cropped to a square.

ComfyUI IMAGEs are float tensors [B, H, W, C] with values in [0, 1]; Load Image always gives 3 channels.
Anything else is checked here, before any model runs: integer tensors and values far outside [0, 1]
(unnormalised 8- or 16-bit data, [-1, 1] data) are refused with the fix; 1-channel (gray) and 2/4-channel
(with alpha) tensors are converted, and the conversion is reported by photo_warnings().
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ResidualError

MIN_SIDE, MAX_SIDE = 64, 4096
# Resampling filters (bicubic, lanczos) overshoot [0, 1] a little at edges: within this margin values are
# clamped; beyond it the data is on another scale.
OVERSHOOT = 0.1
BACKGROUND = 1.0  # transparent areas are composited over white


def _frames(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every photo as [H, W, C], checked; raises a ResidualError naming the photo and the fix."""
    frames = []
    for img in images:
        if not isinstance(img, torch.Tensor) or img.ndim not in (3, 4):
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ResidualError(f"images: got {shape}; an IMAGE is [batch, height, width, channels].",
                                advice="connect_image")
        frames.extend(img if img.ndim == 4 else img[None])
    if not frames:
        raise ResidualError("images: no photos.", advice="connect_photos")
    n = len(frames)
    for i, f in enumerate(frames, start=1):
        name = f"images: photo {i} of {n}"
        h, w, c = f.shape
        if c not in (1, 2, 3, 4):
            raise ResidualError(f"{name} has {c} channels; expected 3 (RGB), or 1 (gray), 2 or 4 (with alpha).")
        if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
            small = min(h, w) < MIN_SIDE
            raise ResidualError(f"{name} is {w}x{h} px; each side must be {MIN_SIDE} to {MAX_SIDE} px. "
                                + ("Use a larger photo (512 px or more is best)." if small else "Scale it down first."),
                                advice=None if small else "scale_down")
        if not f.is_floating_point():
            raise ResidualError(
                f"{name} holds {str(f.dtype).removeprefix('torch.')} integers; IMAGEs are floats in 0-1. Divide "
                "8-bit data by 255 and 16-bit data by 65535.", advice="load_image")
        if not bool(torch.isfinite(f).all()):
            raise ResidualError(f"{name} contains NaN or infinite values: whatever made it failed.",
                                advice="check_upstream")
        lo, hi = (float(v) for v in torch.aminmax(f.float()))
        if lo < -OVERSHOOT or hi > 1 + OVERSHOOT:
            raise ResidualError(
                f"{name} has values from {lo:g} to {hi:g}; IMAGEs hold 0-1. "
                + ("Data in [-1, 1]: rescale with (x + 1) / 2." if lo < 0 and hi <= 1 + OVERSHOOT else
                   "8-bit data: divide by 255; 16-bit data: divide by 65535.")
            )
    return frames


def _rgb(f: torch.Tensor) -> torch.Tensor:
    f = f.float().clamp(0, 1)
    if f.shape[-1] in (2, 4):  # composite the alpha channel over the background
        alpha = f[..., -1:]
        f = f[..., :-1] * alpha + BACKGROUND * (1 - alpha)
    return f.expand(-1, -1, 3)


def square_batch(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """images: IMAGE tensors, each [H, W, C] or a batch [B, H, W, C], of any sizes (checked first).

    Returns [N, size, size, 3]: the shorter side scaled to `size` (antialiased), the centre kept.
    """
    out = []
    for f in _frames(images):
        x = _rgb(f).movedim(-1, 0)[None]
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(x[0, :, top:top + size, left:left + size].movedim(0, -1).clamp(0, 1))
    return torch.stack(out)


def _which(indices: list[int]) -> str:
    return f"photo {indices[0]}" if len(indices) == 1 else f"photos {', '.join(map(str, indices))}"


def photo_warnings(images: list[torch.Tensor], size: int) -> list[str]:
    """What is legal but likely to disappoint, one line each (call after square_batch has checked them)."""
    frames = _frames(images)
    found: dict[str, list[int]] = {"gray": [], "alpha": [], "small": [], "long": []}
    for i, f in enumerate(frames, start=1):
        h, w, c = f.shape
        rgb = f[..., :3] if c >= 3 else None
        if rgb is None or (torch.equal(rgb[..., 0], rgb[..., 1]) and torch.equal(rgb[..., 1], rgb[..., 2])):
            found["gray"].append(i)
        if c in (2, 4) and bool((f[..., -1] < 1).any()):
            found["alpha"].append(i)
        if min(h, w) < size:
            found["small"].append(i)
        if max(h, w) > 2 * min(h, w):
            found["long"].append(i)
    lines = []
    if len(frames) == 1:
        lines.append("Only 1 photo: the residual may copy its pose and background. 3-6 photos from different "
                     "angles and backgrounds generalise better.")
    if found["gray"]:
        lines.append(f"{_which(found['gray'])} without colour (grayscale): the concept is learned with less colour.")
    if found["alpha"]:
        lines.append(f"{_which(found['alpha'])} with transparent areas: they were filled with white.")
    if found["small"]:
        lines.append(f"{_which(found['small'])} smaller than the training resolution {size} px: upscaled, may look soft.")
    if found["long"]:
        lines.append(f"{_which(found['long'])} more than twice as long as wide: only the centre square is used.")
    return lines
