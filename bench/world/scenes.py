"""The small world: flat shapes on a coloured background, 32x32 RGB, with captions and exact ground truth.

Scenes are parameters (shape, colour, centre, size per object, background colour); images render from
them with tensor ops on any device, so pretraining draws fresh scenes every step and the oracle can
redraw what a scene should look like.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

SIZE = 32
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
COLOR_NAMES = list(COLORS)
PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255.0  # [8, 3]
SHAPES = ("circle", "square", "triangle")


def distinct_colors(colors: set[str], min_distance: float = 120.0) -> list[str]:
    """Palette colours far (in RGB) from every one of `colors`: orange is too close to red and yellow, blue to
    purple, for a generator to keep them apart on a 32 px image or for the judge to tell them apart."""
    rgb = {name: torch.tensor(value, dtype=torch.float32) for name, value in COLORS.items()}
    return [c for c in COLOR_NAMES if all(float((rgb[c] - rgb[o]).norm()) >= min_distance for o in colors)]


# Reserved identifier words: in pretraining captions with no visual meaning (as rare tokens are in SD).
IDENTIFIERS = ("sks", "zwx", "qpv", "vbn", "kjh", "tlr")


def shape_mask(shape, cx, cy, r, size: int = SIZE) -> torch.Tensor:
    """Boolean masks [..., size, size] for objects given as tensors of shape index, centre and radius."""
    coords = torch.arange(size, device=cx.device, dtype=torch.float32) + 0.5
    dx = coords.view(1, size) - cx[..., None, None]
    dy = coords.view(size, 1) - cy[..., None, None]
    r = r[..., None, None]
    circle = dx * dx + dy * dy <= r * r
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    triangle = (dy >= -r) & (dy <= 0.75 * r) & (dx.abs() <= (dy + r) / 1.75)
    s = shape[..., None, None]
    return torch.where(s == 0, circle, torch.where(s == 1, square, triangle))


@dataclass
class Obj:
    shape: str
    color: str  # a solid object's colour (a concept's main colour)
    cx: float
    cy: float
    r: float
    say_color: bool = True  # the caption names the colour
    identifier: str | None = None  # written right before the shape word
    pattern: dict | None = None  # a concept's look (concepts.py); None = solid

    def phrase(self) -> str:
        words = ["a"] + ([self.color] if self.say_color and self.pattern is None else [])
        return " ".join(words + ([self.identifier] if self.identifier else []) + [self.shape])


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)
    caption: str = ""


def describe(objects: list[Obj], background: str | None) -> str:
    text = " and ".join(o.phrase() for o in objects)
    return f"{text} on a {background} background" if background else text


def place(rng: random.Random, n: int, slot: int) -> tuple[float, float, float]:
    """Centre and radius of object `slot` of `n`: large alone, smaller side by side (left / right half)."""
    lo, hi = (5.0, 7.0) if n == 2 else (7.0, 11.0)  # two fit side by side without touching
    r = rng.uniform(lo, hi)
    width, x0 = (SIZE / 2, slot * SIZE / 2) if n == 2 else (SIZE, 0.0)
    return x0 + rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, SIZE - r - 1), r


def random_scene(rng: random.Random, identifier_rate=0.1, no_color_rate=0.15, no_background_rate=0.2,
                 empty_rate=0.1, two_rate=0.5) -> Scene:
    """A pretraining scene: one or two solid shapes. Captions sometimes leave out a colour or the
    background (so 'a circle' means a circle of any colour), are sometimes empty (for guidance), and
    sometimes carry a reserved identifier that changes nothing in the picture."""
    bg = rng.choice(COLOR_NAMES)
    n = 2 if rng.random() < two_rate else 1
    objs, taken = [], set()
    for slot in range(n):
        shape, color = rng.choice(SHAPES), rng.choice([c for c in COLOR_NAMES if c != bg])
        while (shape, color) in taken:
            shape, color = rng.choice(SHAPES), rng.choice([c for c in COLOR_NAMES if c != bg])
        taken.add((shape, color))
        ident = rng.choice(IDENTIFIERS) if rng.random() < identifier_rate else None
        objs.append(Obj(shape, color, *place(rng, n, slot), rng.random() >= no_color_rate, ident))
    words = objs[::-1] if rng.random() < 0.5 else objs
    text = describe(words, None if rng.random() < no_background_rate else bg)
    return Scene(bg, objs, "" if rng.random() < empty_rate else text)


def scene_params(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Backgrounds [B] and objects [B, 2, 5] (shape, colour, cx, cy, r; absent objects off-canvas)."""
    rows = [[(SHAPES.index(o.shape), COLOR_NAMES.index(o.color), o.cx, o.cy, o.r) for o in s.objects[:2]]
            + [(0, 0, -100.0, -100.0, 0.0)] * (2 - len(s.objects[:2])) for s in scenes]
    return torch.tensor([COLOR_NAMES.index(s.background) for s in scenes]), torch.tensor(rows, dtype=torch.float32)


def render_params(background: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """Batched render of solid objects from scene_params tensors (on their device) -> [B, 3, SIZE, SIZE]."""
    palette = PALETTE.to(objects.device)
    masks = shape_mask(objects[..., 0].long(), objects[..., 2], objects[..., 3], objects[..., 4])  # [B, 2, S, S]
    out = palette[background][:, :, None, None].expand(-1, -1, SIZE, SIZE)
    for j in range(objects.shape[1]):
        out = torch.where(masks[:, j, None], palette[objects[:, j, 1].long()][:, :, None, None], out)
    return out.contiguous()


def render(scenes: list[Scene], device: torch.device | str = "cpu") -> torch.Tensor:
    """Images [B, 3, SIZE, SIZE] in [0, 1]; patterned objects (concepts) paint their own colours."""
    from .concepts import pattern_colors

    background, objects = scene_params(scenes)
    out = render_params(background.to(device), objects.to(device)).clone()
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            if o.pattern is not None:
                t = lambda v: torch.tensor(v, device=device)  # noqa: E731
                mask = shape_mask(t(SHAPES.index(o.shape)), t(o.cx), t(o.cy), t(o.r))
                out[i] = torch.where(mask, pattern_colors(o, scene.background, device), out[i])
    return out
