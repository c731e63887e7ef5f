"""Pictures people would rather look at than read: the loss curve and the LAG mask preview."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


def _to_image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def loss_curve(losses: list[float], title: str, warnings: Sequence[str] = (), size: tuple[int, int] = (640, 360)
               ) -> torch.Tensor:
    """The per-step loss (grey) and its moving average (blue), as a ComfyUI IMAGE [1, H, W, 3]. Warnings
    about the inputs are printed in red above the plot, where the user looks after training."""
    return _to_image(loss_curve_picture(losses, title, warnings, size))


def loss_curve_picture(losses: list[float], title: str, warnings: Sequence[str] = (),
                       size: tuple[int, int] = (640, 360)) -> Image.Image:
    """loss_curve as a PIL image (what a progress-bar preview sends)."""
    lines = [line for text in warnings for line in textwrap.wrap(f"! {text}", 100, subsequent_indent="  ")]
    w, h = size[0], size[1] + 12 * len(lines)
    left, right, top, bottom = 64, 16, 30 + 12 * len(lines), 36
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((8, 24 + 12 * i), line, fill="#c00000", font=font)
    values = np.asarray(losses, dtype=np.float64)
    window = max(1, len(values) // 15)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1e-6

    def xy(i, v):
        x = left + (w - left - right) * (i / max(1, len(values) - 1))
        return x, top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))

    draw.rectangle([left, top, w - right, h - bottom], outline="#888")
    draw.line([xy(i, v) for i, v in enumerate(values)], fill="#bbb", width=1)
    if len(smooth) > 1:
        draw.line([xy(i + window - 1, v) for i, v in enumerate(smooth)], fill="#1f6fd0", width=2)
    draw.text((left, 8), f"{title}: loss per step (blue: mean of {window})", fill="black", font=font)
    draw.text((4, top - 6), f"{hi:.4f}", fill="black", font=font)
    draw.text((4, h - bottom - 6), f"{lo:.4f}", fill="black", font=font)
    draw.text((left, h - bottom + 8), "0", fill="black", font=font)
    draw.text((w - right - 60, h - bottom + 8), f"step {len(values)}", fill="black", font=font)
    draw.text((w // 2 - 60, h - bottom + 8), f"last {float(smooth[-1]):.4f}", fill="#1f6fd0", font=font)
    return img


def sample_grid(rows: list[list[torch.Tensor]], row_labels: Sequence[str], column_labels: Sequence[str]
                ) -> torch.Tensor:
    """Images [H, W, 3] in rows (a row per prompt, one image per column), each row under its prompt and the columns
    under their labels, as a ComfyUI IMAGE [1, H, W, 3]."""
    h, w = rows[0][0].shape[:2]
    cell_w = max(w, 96)
    head, line = 16, 12
    wrapped = [textwrap.wrap(text, max(20, cell_w * len(column_labels) // 6))[:3] or [""] for text in row_labels]
    height = head + sum(len(lines) * line + 4 + h for lines in wrapped)
    img = Image.new("RGB", (cell_w * len(column_labels), height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for j, label in enumerate(column_labels):
        draw.text((j * cell_w + 4, 2), label, fill="black", font=font)
    y = head
    for lines, row in zip(wrapped, rows, strict=True):
        for k, text in enumerate(lines):
            draw.text((4, y + k * line), text, fill="#1f6fd0", font=font)
        y += len(lines) * line + 4
        for j, cell in enumerate(row):
            pixels = (cell.numpy() * 255).round().astype(np.uint8)
            img.paste(Image.fromarray(pixels), (j * cell_w, y))
        y += h
    return _to_image(img)


def _grid_shape(tokens: int, height: int, width: int) -> tuple[int, int]:
    """Spatial shape of a block's token grid: the latent halved (rounding up) until it has `tokens` cells."""
    h, w = height, width
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"can't lay {tokens} tokens on a grid for a {height}x{width} latent")
    return h, w


CONCEPT_COLORS = torch.tensor([[1.0, 0.15, 0.1], [0.1, 0.35, 1.0], [0.1, 0.8, 0.2], [1.0, 0.85, 0.1],
                               [0.9, 0.1, 0.9], [0.1, 0.9, 0.9]])


def mask_preview(concepts: list[dict[tuple, torch.Tensor]], latent_hw: tuple[int, int], scale: int = 8,
                 images: torch.Tensor | None = None) -> torch.Tensor:
    """Each concept's per-block masks [B, tokens] averaged at pixel size, tinted in its colour over the images
    [B, H, W, 3] (or over black). Returns [B, H, W, 3]."""
    h, w = latent_hw
    size = (h * scale, w * scale) if images is None else tuple(images.shape[1:3])
    heats = []
    for masks in concepts:
        layers = []
        for m in masks.values():
            gh, gw = _grid_shape(m.shape[1], h, w)
            grid = m.float().cpu().view(-1, 1, gh, gw)
            layers.append(F.interpolate(grid, size=size, mode="bilinear", align_corners=False))
        heats.append(torch.stack(layers).mean(0)[:, 0, :, :, None].clamp(0, 1) if layers else None)  # [B, H, W, 1]
    rows = next(hm.shape[0] for hm in heats if hm is not None)
    base = torch.zeros(rows, *size, 3) if images is None else images[..., :3].float().cpu()
    if base.shape[0] != rows:
        base = base[:1].expand(rows, -1, -1, -1)
    out = base.clone()
    for i, heat in enumerate(heats):
        if heat is not None:
            alpha = 0.6 * heat if images is not None else heat
            out = out * (1 - alpha) + CONCEPT_COLORS[i % len(CONCEPT_COLORS)] * alpha
    return out.clamp(0, 1)
