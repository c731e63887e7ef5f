"""Concepts: objects the base model never saw, defined by a spec file (concepts.json), no code per concept.

A pattern paints palette colours over an object's mask in the object's own coordinates (u, v), scaled
by its radius, so a concept looks the same at any position and size.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .scenes import COLOR_NAMES, PALETTE, SIZE, Obj, Scene, distinct_colors, place

SPEC = Path(__file__).with_name("concepts.json")
PATTERNS = ("halves", "checker", "stripes", "ring", "border", "dot")
# How the second base model's captions name each pattern ("a blue and orange twotone circle", "a purple
# hollow circle"); the first base model never saw these words.
PATTERN_WORDS = {"halves": "twotone", "checker": "checkered", "stripes": "striped", "ring": "hollow",
                 "border": "bordered", "dot": "dotted"}


@dataclass(frozen=True)
class Concept:
    name: str
    class_word: str
    pattern: dict

    @property
    def colors(self) -> set[str]:
        return {v for k, v in self.pattern.items() if k != "type" and isinstance(v, str)} | set(
            self.pattern.get("colors", []))

    def obj(self, cx: float, cy: float, r: float, identifier: str | None = "sks") -> Obj:
        return Obj(self.class_word, sorted(self.colors)[0], cx, cy, r, identifier=identifier, pattern=self.pattern)

    def references(self, n: int = 5, seed: int = 0) -> list[Scene]:
        """Reference renders: the concept alone, at varied places and sizes, on backgrounds far from its colours."""
        rng = random.Random(f"{self.name}-{seed}")
        backgrounds = distinct_colors(self.colors)
        return [Scene(rng.choice(backgrounds), [self.obj(*place(rng, 1, 0))]) for _ in range(n)]


def load_concepts(path: Path = SPEC) -> tuple[dict[str, Concept], list[str]]:
    spec = json.loads(path.read_text())
    concepts = {}
    for name, c in spec["concepts"].items():
        if c["pattern"]["type"] not in PATTERNS:
            raise ValueError(f"concept {name}: pattern type must be one of {PATTERNS}")
        concepts[name] = Concept(name, c["class"], c["pattern"])
    return concepts, spec.get("tuning", [])


# A pattern as numbers, for batched rendering: its type's index in PATTERNS, two palette colours (the ring's
# second is the background) and its one size parameter, read from the spec's keys below.
PATTERN_FIELDS = {"halves": ("left", "right", None), "checker": ("colors", "colors", "cells"),
                  "stripes": ("colors", "colors", "count"), "ring": ("color", None, "hole"),
                  "border": ("fill", "edge", "width"), "dot": ("fill", "dot", "size")}
PATTERN_DEFAULTS = {"halves": 0.0, "checker": 2.0, "stripes": 3.0, "ring": 0.5, "border": 0.35, "dot": 0.4}


def pattern_numbers(pattern: dict, background: str) -> tuple[int, int, int, float]:
    """(type index, first colour, second colour, parameter) of a pattern spec."""
    kind, idx = pattern["type"], COLOR_NAMES.index
    first, second, param = PATTERN_FIELDS[kind]
    c1 = idx(pattern[first][0] if first == "colors" else pattern[first])
    c2 = idx(background) if second is None else idx(pattern[second][1] if second == "colors" else pattern[second])
    return PATTERNS.index(kind), c1, c2, float(pattern.get(param, PATTERN_DEFAULTS[kind]) if param else 0.0)


def paint(kind: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, param: torch.Tensor, u: torch.Tensor,
          v: torch.Tensor) -> torch.Tensor:
    """Palette index per pixel of patterned objects: kind, c1, c2, param [...], u, v [..., S, S] (the pixel in
    the object's own coordinates) -> [..., S, S] (meaningful inside each object's mask)."""
    kind, c1, c2, param = (t[..., None, None] for t in (kind, c1, c2, param))
    second = {
        "halves": u >= 0,
        "checker": (torch.floor((u + 1) * param / 2) + torch.floor((v + 1) * param / 2)).long() % 2 == 1,
        "stripes": torch.floor((v + 1) * param / 2).long() % 2 == 1,
        "ring": u * u + v * v <= param**2,  # the hole shows the background (c2)
        "border": torch.maximum(u.abs(), v.abs()) > 0.85 - param,
        "dot": u * u + v * v <= param**2,
    }
    use_second = torch.zeros_like(u, dtype=torch.bool)
    for i, name in enumerate(PATTERNS):
        use_second = torch.where(kind == i, second[name], use_second)
    return torch.where(use_second, c2, c1)


def object_coordinates(cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) [..., SIZE, SIZE]: each pixel centre relative to the object's centre, in radii."""
    coords = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5
    u = (coords.view(1, SIZE) - cx[..., None, None]) / r[..., None, None]
    v = (coords.view(SIZE, 1) - cy[..., None, None]) / r[..., None, None]
    return u.expand(*cx.shape, SIZE, SIZE), v.expand(*cx.shape, SIZE, SIZE)


def pattern_words(pattern: dict) -> list[str]:
    """The caption's words for a pattern: its colours in the spec's order, then the pattern's word."""
    first, second, _ = PATTERN_FIELDS[pattern["type"]]
    if first == "colors":
        colors = list(pattern["colors"][:2])
    else:
        colors = [pattern[first]] + ([pattern[second]] if second else [])
    return [*" and ".join(colors).split(), PATTERN_WORDS[pattern["type"]]]


def random_pattern(rng: random.Random, background: str, shape: str) -> dict:
    """A pattern of random type, colours (far from each other and from the background, so the oracle can read
    it) and size. A hole only in a circle: in a triangle or square it splits the shape the oracle reads."""
    kind = rng.choice([k for k in PATTERNS if k != "ring" or shape == "circle"])
    first = rng.choice(distinct_colors({background}))
    second = rng.choice(distinct_colors({background, first}))
    size = {"halves": None, "checker": ("cells", rng.choice([2, 3])), "stripes": ("count", rng.choice([3, 4])),
            "ring": ("hole", rng.uniform(0.4, 0.6)), "border": ("width", rng.uniform(0.3, 0.45)),
            "dot": ("size", rng.uniform(0.35, 0.5))}[kind]
    a, b, _ = PATTERN_FIELDS[kind]
    pattern = {"type": kind} | ({"colors": [first, second]} if a == "colors" else {a: first})
    if b and b != "colors":
        pattern[b] = second
    return pattern | (dict([size]) if size else {})



def evaluated_concepts() -> list[Concept]:
    """The concepts the evaluation scores: all but the tuning ones."""
    concepts, tuning = load_concepts()
    return [c for name, c in concepts.items() if name not in tuning]

def pattern_labels(obj: Obj, background: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Palette index per pixel [SIZE, SIZE] of a patterned object (meaningful inside its mask)."""
    kind, c1, c2, param = (torch.tensor(x, device=device) for x in pattern_numbers(obj.pattern, background))
    t = lambda x: torch.tensor(float(x), device=device)  # noqa: E731
    u, v = object_coordinates(t(obj.cx), t(obj.cy), t(obj.r), device)
    return paint(kind, c1, c2, param, u, v)


def pattern_colors(obj: Obj, background: str, device: torch.device | str = "cpu") -> torch.Tensor:
    return PALETTE.to(device)[pattern_labels(obj, background, device)].permute(2, 0, 1)
