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


def pattern_labels(obj: Obj, background: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Palette index per pixel [SIZE, SIZE] of a patterned object (meaningful inside its mask)."""
    p, idx = obj.pattern, COLOR_NAMES.index
    coords = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5
    u = ((coords.view(1, SIZE) - obj.cx) / obj.r).expand(SIZE, SIZE)
    v = ((coords.view(SIZE, 1) - obj.cy) / obj.r).expand(SIZE, SIZE)
    full = torch.full((SIZE, SIZE), 0, dtype=torch.long, device=device)
    kind = p["type"]
    if kind == "halves":
        return torch.where(u < 0, full + idx(p["left"]), full + idx(p["right"]))
    if kind == "checker":
        cells = p.get("cells", 2)
        parity = (torch.floor((u + 1) * cells / 2) + torch.floor((v + 1) * cells / 2)).long() % 2
        return torch.where(parity == 0, full + idx(p["colors"][0]), full + idx(p["colors"][1]))
    if kind == "stripes":
        band = torch.floor((v + 1) * p.get("count", 3) / 2).long() % 2
        return torch.where(band == 0, full + idx(p["colors"][0]), full + idx(p["colors"][1]))
    if kind == "ring":
        hole = u * u + v * v <= p.get("hole", 0.5) ** 2
        return torch.where(hole, full + idx(background), full + idx(p["color"]))
    if kind == "border":
        inner = torch.maximum(u.abs(), v.abs()) <= 0.85 - p.get("width", 0.35)
        return torch.where(inner, full + idx(p["fill"]), full + idx(p["edge"]))
    if kind == "dot":
        dot = u * u + v * v <= p.get("size", 0.4) ** 2
        return torch.where(dot, full + idx(p["dot"]), full + idx(p["fill"]))
    raise ValueError(f"unknown pattern {kind!r}")


def pattern_colors(obj: Obj, background: str, device: torch.device | str = "cpu") -> torch.Tensor:
    return PALETTE.to(device)[pattern_labels(obj, background, device)].permute(2, 0, 1)
