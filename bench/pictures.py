"""PNG pictures for the evaluation report: a sample grid and identity against locality."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CELL, LABEL = 96, 190


def _pil(image: torch.Tensor, size: int = CELL) -> Image.Image:
    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def grid_png(path: Path, rows: dict[str, dict], prompts: list, references: torch.Tensor, title: str) -> None:
    """Rows: methods (plus the concept's reference renders); columns: prompts; one seed throughout."""
    font = ImageFont.load_default()
    head = 70
    width = LABEL + CELL * max(len(prompts), len(references))
    img = Image.new("RGB", (width, head + CELL * (len(rows) + 1) + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill="black", font=font)
    for j, p in enumerate(prompts):
        caption = textwrap.fill(p.caption, 18)
        draw.multiline_text((LABEL + j * CELL + 2, 22), caption, fill="black", font=font, spacing=1)
    y = head
    draw.text((8, y + CELL // 2 - 6), "references", fill="black", font=font)
    for j, ref in enumerate(references):
        img.paste(_pil(ref), (LABEL + j * CELL, y))
    for name, cells in rows.items():
        y += CELL
        draw.multiline_text((8, y + CELL // 2 - 12), textwrap.fill(name, 28), fill="black", font=font)
        for j, p in enumerate(prompts):
            if p in cells:
                img.paste(_pil(cells[p]), (LABEL + j * CELL, y))
    img.save(path)


def scatter_png(path: Path, summary: dict[str, dict], size=(760, 520)) -> None:
    """Identity (oracle) against locality, one point per method, bars = spread over seeds."""
    font = ImageFont.load_default()
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 230, 30, 50
    pts = {m: (s["locality"], s["identity"]) for m, s in summary.items() if "locality" in s}
    xs = [v[0][0] for v in pts.values()]
    ys = [v[1][0] for v in pts.values()]
    x0, x1 = min(xs) - 0.02, max(xs) + 0.02
    y0, y1 = min(ys) - 0.05, max(ys) + 0.05

    def at(x, y):
        return (left + (x - x0) / (x1 - x0) * (size[0] - left - right),
                size[1] - bottom - (y - y0) / (y1 - y0) * (size[1] - top - bottom))

    draw.rectangle([left, top, size[0] - right, size[1] - bottom], outline="#888")
    draw.text((left, 8), "identity (oracle) vs locality; bars: std over seeds", fill="black", font=font)
    draw.text((size[0] // 2 - 60, size[1] - 20), "locality (higher: rest of image kept)", fill="black", font=font)
    draw.text((4, top - 20), "identity", fill="black", font=font)
    for v, label in ((y0, f"{y0:.2f}"), (y1, f"{y1:.2f}")):
        draw.text((10, at(x0, v)[1] - 6), label, fill="black", font=font)
    for v in (x0, x1):
        draw.text((at(v, y0)[0] - 14, size[1] - bottom + 6), f"{v:.2f}", fill="black", font=font)
    colors = ["#1f6fd0", "#d0401f", "#2a9d3a", "#8a3fd0", "#d09a1f", "#1fb0b0", "#555555", "#d01f8a", "#7a5c2e",
              "#3f3fd0", "#909000", "#000000", "#e07070", "#70b0e0", "#50d050", "#a0a0a0"]
    for i, (method, ((lx, lsd), (iy, isd))) in enumerate(pts.items()):
        c = colors[i % len(colors)]
        px, py = at(lx, iy)
        draw.line([at(lx - lsd, iy), at(lx + lsd, iy)], fill=c, width=1)
        draw.line([at(lx, iy - isd), at(lx, iy + isd)], fill=c, width=1)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=c)
        ly = top + 14 * i + 6  # the default font has no bullet glyph: the legend's dot is drawn
        draw.ellipse([size[0] - right + 8, ly - 3, size[0] - right + 14, ly + 3], fill=c)
        draw.text((size[0] - right + 20, ly - 6), method, fill=c, font=font)
    img.save(path)


def pair_grid(path: Path, rows: dict[str, torch.Tensor], title: str, references: torch.Tensor) -> None:
    """Rows: variants; columns: the pair prompts (one image each, same seed); first row: references."""
    font = ImageFont.load_default()
    head = 30
    width = LABEL + CELL * max(len(references), max(len(v) for v in rows.values()))
    img = Image.new("RGB", (width, head + CELL * (len(rows) + 1)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((8, head + CELL // 2 - 6), "references A, B", fill="black", font=font)
    for j, ref in enumerate(references):
        img.paste(_pil(ref), (LABEL + j * CELL, head))
    for i, (name, images) in enumerate(rows.items(), start=1):
        draw.multiline_text((8, head + i * CELL + CELL // 2 - 12), textwrap.fill(name, 28), fill="black", font=font)
        for j, image in enumerate(images):
            img.paste(_pil(image), (LABEL + j * CELL, head + i * CELL))
    img.save(path)
