"""The exact judge: reads a generated image back into background, objects (shape, colour) and patterns.

Every pixel takes its nearest palette colour. The background is the commonest colour on the border;
objects are the connected regions of other colours, holes filled (a ring is one object). Shape is the
ideal shape, stretched over the object's bounding box, that overlaps it best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .concepts import Concept, pattern_labels
from .scenes import COLOR_NAMES, PALETTE, SHAPES, Obj

MIN_AREA = 12  # pixels; smaller blobs are noise
IDENTITY_HIT = 0.8  # fraction of an object's pixels in the concept's colours at the right places (references: >= 0.86)


def palette_labels(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W] palette indices."""
    d = ((images.float().cpu().permute(0, 2, 3, 1)[..., None, :] - PALETTE) ** 2).sum(-1)
    return d.argmin(-1).numpy()


def _flood(mask: np.ndarray, seeds: list[tuple[int, int]]) -> np.ndarray:
    """Pixels of `mask` 4-connected to any seed."""
    out = np.zeros_like(mask)
    stack = [s for s in seeds if mask[s]]
    h, w = mask.shape
    while stack:
        y, x = stack.pop()
        if out[y, x]:
            continue
        out[y, x] = True
        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not out[ny, nx]:
                stack.append((ny, nx))
    return out


@dataclass
class Thing:
    mask: np.ndarray  # filled region [H, W]
    shape: str
    color: str  # commonest non-background colour inside
    bbox: tuple[int, int, int, int]  # top, left, bottom, right (inclusive)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def as_obj(self, concept: Concept) -> Obj:
        """The concept placed where this thing is."""
        return concept.obj(*_placement(self.shape, self.bbox))


@dataclass
class Reading:
    labels: np.ndarray
    background: str
    things: list[Thing]

    def find(self, shape: str, color: str | None = None) -> Thing | None:
        hits = [t for t in self.things if t.shape == shape and (color is None or t.color == color)]
        return max(hits, key=lambda t: t.area) if hits else None


def _placement(shape: str, bbox: tuple[int, int, int, int]) -> tuple[float, float, float]:
    """Centre and radius of a shape drawn to fill this bounding box (inverse of scenes.shape_mask)."""
    top, left, bottom, right = bbox
    w = right - left + 1
    cx = left + w / 2
    if shape == "circle":
        return cx, (top + bottom + 1) / 2, w / 2
    if shape == "square":
        return cx, (top + bottom + 1) / 2, w / 1.7
    return cx, top + w / 2, w / 2


def _shape(mask: np.ndarray) -> tuple[str, tuple[int, int, int, int]]:
    """The shape whose ideal drawing stretched over the region's bounding box (rectangle, inscribed
    ellipse, or triangle with its apex at the top) overlaps the region best. Robust to the ragged edges
    a generator draws and to pixel rounding, unlike a fill-ratio rule."""
    ys, xs = np.nonzero(mask)
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())
    region = mask[top:bottom + 1, left:right + 1]
    h, w = region.shape
    v = ((np.arange(h) + 0.5) / h)[:, None]
    u = ((np.arange(w) + 0.5) / w)[None, :]
    ideals = {
        "square": np.ones((h, w), dtype=bool),
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(u - 0.5) <= v / 2,
    }
    iou = {k: (m & region).sum() / max(1, (m | region).sum()) for k, m in ideals.items()}
    return max(iou, key=iou.get), (top, left, bottom, right)


def read(labels: np.ndarray) -> Reading:
    h, w = labels.shape
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(COLOR_NAMES)).argmax())
    edge = [(y, x) for y in range(h) for x in (0, w - 1)] + [(y, x) for x in range(w) for y in (0, h - 1)]
    outside = _flood(labels == bg, edge)
    filled = ~outside
    things, seen = [], np.zeros_like(filled)
    for y, x in zip(*np.nonzero(filled), strict=True):
        if seen[y, x]:
            continue
        region = _flood(filled, [(y, x)])
        seen |= region
        if region.sum() < MIN_AREA:
            continue
        shape, bbox = _shape(region)
        inside = labels[region & (labels != bg)]
        color = COLOR_NAMES[int(np.bincount(inside, minlength=len(COLOR_NAMES)).argmax())]
        things.append(Thing(region, shape, color, bbox))
    return Reading(labels, COLOR_NAMES[bg], things)


def read_images(images: torch.Tensor) -> list[Reading]:
    return [read(lab) for lab in palette_labels(images)]


def identity(reading: Reading, concept: Concept) -> tuple[float, Thing | None]:
    """Best match of the concept's pattern over the things of its class: the fraction of the thing's
    pixels whose colour is what the concept has there (holes included). 0 when no thing has the class."""
    best, where = 0.0, None
    for thing in reading.things:
        if thing.shape != concept.class_word:
            continue
        expected = pattern_labels(thing.as_obj(concept), reading.background).numpy()
        score = float((reading.labels[thing.mask] == expected[thing.mask]).mean())
        if score > best:
            best, where = score, thing
    return best, where


def dilate(mask: np.ndarray, steps: int = 2) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def kept(reading: Reading, base: Reading, region: np.ndarray | None = None) -> float:
    """Fraction of pixels outside `region` whose colour is the same as in the base image."""
    outside = ~region if region is not None else np.ones_like(reading.labels, dtype=bool)
    return float((reading.labels[outside] == base.labels[outside]).mean()) if outside.any() else 1.0


def prompt_fidelity(reading: Reading, background: str, objects: list[tuple[str, str | None]]) -> bool:
    """Background right, and every (shape, colour) asked for present (colour None: any)."""
    return reading.background == background and all(reading.find(s, c) is not None for s, c in objects)


__all__ = ["IDENTITY_HIT", "SHAPES", "Reading", "Thing", "dilate", "identity", "kept", "palette_labels",
           "prompt_fidelity", "read", "read_images"]
