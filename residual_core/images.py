"""Concept photos -> one training batch: RGB, resized and centre-cropped to a square.

ComfyUI IMAGEs are float tensors [B, H, W, C] with values in [0, 1]; Load Image always gives 3 channels.
Anything else is checked here, before any model runs: integer tensors and values far outside [0, 1]
(unnormalised 8- or 16-bit data, [-1, 1] data) are refused with the fix; 1-channel (gray) and 2/4-channel
(with alpha) tensors are converted, and the conversion is reported by photo_warnings().

Subject masks (ComfyUI MASKs, [B, H, W] in 0-1, one per photo) are checked against the photos and cropped
and resized exactly as they are (square_masks), so mask i still covers photo i's subject.
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


def _square(x: torch.Tensor, size: int) -> torch.Tensor:
    """[C, H, W] -> [C, size, size]: the shorter side scaled to `size` (antialiased), the centre kept."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size].clamp(0, 1)


def square_batch(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """images: IMAGE tensors, each [H, W, C] or a batch [B, H, W, C], of any sizes (checked first).

    Returns [N, size, size, 3]: the shorter side scaled to `size` (antialiased), the centre kept.
    """
    return torch.stack([_square(_rgb(f).movedim(-1, 0), size).movedim(0, -1) for f in _frames(images)])


# ---------------------------------------------------------------- subject masks

MASK_MARKS = ("subject", "background")  # what a mask's 1 marks: segmentation nodes mark the subject, Load
# Image's MASK (1 - alpha) the transparent background of a cut-out PNG
MASK_TOLERANCE = 1e-3  # resampling leaves values a hair outside 0-1; beyond this a mask is on another scale
EMPTY_LOAD_IMAGE_MASK = (64, 64)  # what Load Image gives as MASK for a picture without transparency
BORDER_FULL = 0.95  # a subject mask that covers this share of the photo's border probably marks the background


def _mask_frames(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every mask as [H, W] float in 0-1, checked; a 2-D MASK counts as a batch of one (ComfyUI treats it so)."""
    frames = []
    for m in masks:
        if not isinstance(m, torch.Tensor) or m.ndim not in (2, 3):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ResidualError(f"masks: got {shape}; a MASK is [batch, height, width] in 0-1, one mask per photo. "
                                "An IMAGE ([batch, height, width, channels]) is not a mask: convert it to one first.",
                                advice="image_to_mask")
        frames.extend(m if m.ndim == 3 else m[None])
    n = len(frames)
    out = []
    for i, m in enumerate(frames, start=1):
        if m.dtype == torch.bool:
            m = m.float()
        if not m.is_floating_point():
            raise ResidualError(f"masks: mask {i} of {n} holds {str(m.dtype).removeprefix('torch.')} integers; MASKs "
                                "are floats in 0-1. Divide 8-bit data by 255.")
        if not bool(torch.isfinite(m).all()):
            raise ResidualError(f"masks: mask {i} of {n} contains NaN or infinite values: whatever made it failed.")
        lo, hi = (float(v) for v in torch.aminmax(m.float()))
        if lo < -MASK_TOLERANCE or hi > 1 + MASK_TOLERANCE:
            raise ResidualError(f"masks: mask {i} of {n} has values from {lo:g} to {hi:g}; a MASK holds 0-1 (1 marks "
                                "the subject). 8-bit data: divide by 255.")
        out.append(m.float().clamp(0, 1))
    return out


def _which_photos(photos: list[int]) -> str:
    return f"photo {photos[0]}" if len(photos) == 1 else f"photos {', '.join(map(str, photos))}"


def square_masks(masks: list[torch.Tensor], images: list[torch.Tensor], size: int,
                 marks: str = "subject") -> torch.Tensor:
    """masks: MASK tensors ([B, H, W] or [H, W]), one per photo of `images`, in the photos' order and sizes;
    `marks` says what their 1 marks (MASK_MARKS). Returns the subject masks [N, size, size], 1 on the subject,
    cropped and resized exactly as square_batch crops and resizes the photos. Raises a ResidualError naming
    the mask and the fix for a wrong count, size, shape or range, and for a mask with no subject in it."""
    if marks not in MASK_MARKS:
        raise ResidualError(f"mask_marks must be one of {MASK_MARKS}, got {marks!r}.")
    photos = _frames(images)
    frames = _mask_frames(masks)
    if len(frames) != len(photos):
        raise ResidualError(f"masks: {len(frames)} mask(s) for {len(photos)} photo(s); give one mask per photo, in "
                            "the photos' order (a MASK batch of the same length as the IMAGE batch).")
    for i, (m, f) in enumerate(zip(frames, photos, strict=True), start=1):
        if m.shape != f.shape[:2]:
            (mh, mw), (h, w) = m.shape, f.shape[:2]
            empty = (tuple(m.shape) == EMPTY_LOAD_IMAGE_MASK and not bool(m.any()))
            raise ResidualError(
                f"masks: mask {i} is {mw}x{mh} px but photo {i} is {w}x{h} px; each mask must have its photo's size. "
                + ("This is the empty 64x64 MASK a loader gives for a picture without transparency: use a PNG with "
                   "the background cut out, or a segmentation node on the photo." if empty else
                   "Make the mask from the photo itself, or resize it to the photo's size."),
                advice="load_image_mask" if empty else None)
    subject = [m if marks == "subject" else 1 - m for m in frames]
    empty = [i for i, m in enumerate(subject, start=1) if not bool(m.any())]
    if empty:
        what = ("all 0: no subject marked" if marks == "subject" else
                "all 1: with mask_marks 'background' that is background everywhere")
        raise ResidualError(f"masks: the mask of {_which_photos(empty)} is {what}, so training would learn nothing "
                            "from it. Mark the subject in it, or leave that photo out.")
    squared = torch.stack([_square(m[None], size)[0] for m in subject])
    cropped = [i for i, m in enumerate(squared, start=1) if not bool(m.any())]
    if cropped:
        raise ResidualError(f"masks: the subject of {_which_photos(cropped)} lies outside the centre square that "
                            "training keeps of a long photo. Crop the photo (and its mask) around the subject.")
    return squared


def mask_warnings(masks: list[torch.Tensor], marks: str = "subject") -> list[str]:
    """What is legal but likely wrong about the masks, one line each (call after square_masks checked them)."""
    frames = [m if marks == "subject" else 1 - m for m in _mask_frames(masks)]
    full = []
    for i, m in enumerate(frames, start=1):
        border = torch.cat([m[0], m[-1], m[1:-1, 0], m[1:-1, -1]])
        if float((border >= 0.5).float().mean()) >= BORDER_FULL:
            full.append(i)
    if not full:
        return []
    return [f"masks: the subject mask of {_which_photos(full)} covers the whole border of the photo: it probably "
            "marks the background (a MASK made from a cut-out PNG's transparency is 1 on the background): if so, set "
            f"mask_marks to '{'background' if marks == 'subject' else 'subject'}'."]


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
