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
MAX_WORDS = 14  # a caption's words, in the text encoder's one chunk of 16 tokens (text.py)


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
    say_pattern: bool = False  # the caption describes the pattern ("a red and yellow checkered square")

    def phrase(self) -> str:
        if self.pattern is not None and self.say_pattern:
            from .concepts import pattern_words

            words = ["a", *pattern_words(self.pattern)]
        else:
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
                 empty_rate=0.1, two_rate=0.5, pattern_rate=0.0) -> Scene:
    """A pretraining scene: one or two shapes, solid or (pattern_rate: the second base model's world) with a
    random pattern its caption describes. Captions sometimes leave out a colour or the background (so 'a
    circle' means a circle of any colour), are sometimes empty (for guidance), and sometimes carry a
    reserved identifier that changes nothing in the picture."""
    bg = rng.choice(COLOR_NAMES)
    n = 2 if rng.random() < two_rate else 1
    objs, taken = [], set()
    for slot in range(n):
        shape, color = rng.choice(SHAPES), rng.choice([c for c in COLOR_NAMES if c != bg])
        while (shape, color) in taken:
            shape, color = rng.choice(SHAPES), rng.choice([c for c in COLOR_NAMES if c != bg])
        taken.add((shape, color))
        ident = rng.choice(IDENTIFIERS) if rng.random() < identifier_rate else None
        obj = Obj(shape, color, *place(rng, n, slot), rng.random() >= no_color_rate, ident)
        if pattern_rate and rng.random() < pattern_rate:
            from .concepts import random_pattern

            obj.pattern, obj.say_pattern = random_pattern(rng, bg, shape), obj.say_color
        objs.append(obj)
    words = objs[::-1] if rng.random() < 0.5 else objs
    text = describe(words, None if rng.random() < no_background_rate else bg)
    if len(text.split()) > MAX_WORDS:  # two described patterns: leave out the background, then the identifiers
        text = describe(words, None)
        if len(text.split()) > MAX_WORDS:
            for o in objs:
                o.identifier = None
            text = describe(words, None)
    return Scene(bg, objs, "" if rng.random() < empty_rate else text)


def scene_params(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Backgrounds [B] and objects [B, 2, 9]: shape, colour, cx, cy, r, then the pattern (type index or -1
    for a solid object, two colours, parameter: concepts.pattern_numbers); absent objects off-canvas."""
    from .concepts import pattern_numbers

    def row(o: Obj, background: str):
        pattern = pattern_numbers(o.pattern, background) if o.pattern is not None else (-1, 0, 0, 0.0)
        return (SHAPES.index(o.shape), COLOR_NAMES.index(o.color), o.cx, o.cy, o.r, *pattern)

    absent = (0, 0, -100.0, -100.0, 0.0, -1, 0, 0, 0.0)
    rows = [[row(o, s.background) for o in s.objects[:2]] + [absent] * (2 - len(s.objects[:2])) for s in scenes]
    return torch.tensor([COLOR_NAMES.index(s.background) for s in scenes]), torch.tensor(rows, dtype=torch.float32)


def render_params(background: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """Batched render from scene_params tensors (on their device) -> [B, 3, SIZE, SIZE]; patterned objects paint
    their pattern's colours."""
    from .concepts import object_coordinates, paint

    palette = PALETTE.to(objects.device)
    masks = shape_mask(objects[..., 0].long(), objects[..., 2], objects[..., 3], objects[..., 4])  # [B, 2, S, S]
    out = palette[background][:, :, None, None].expand(-1, -1, SIZE, SIZE)
    for j in range(objects.shape[1]):
        o = objects[:, j]
        color = palette[o[:, 1].long()][:, :, None, None]
        if (o[:, 5] >= 0).any():
            u, v = object_coordinates(o[:, 2], o[:, 3], o[:, 4].clamp(min=1e-6), o.device)
            labels = paint(o[:, 5].long(), o[:, 6].long(), o[:, 7].long(), o[:, 8], u, v)
            color = torch.where((o[:, 5] >= 0)[:, None, None, None], palette[labels].permute(0, 3, 1, 2), color)
        out = torch.where(masks[:, j, None], color, out)
    return out.contiguous()


def render(scenes: list[Scene], device: torch.device | str = "cpu") -> torch.Tensor:
    """Images [B, 3, SIZE, SIZE] in [0, 1]; patterned objects (concepts) paint their own colours."""
    background, objects = scene_params(scenes)
    return render_params(background.to(device), objects.to(device))
