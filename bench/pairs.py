"""Two concepts in one image: does each keep its own look, and does one bleed onto the other?

For pairs of concepts of different classes (A with identifier 'sks', B with 'zwx'), each residual is
trained on its own photos, then prompts such as "a sks square and a zwx circle on a green background"
are sampled four ways at the same seeds:
  - base model (class words only),
  - both residuals applied globally (their deltas summed),
  - one merged residual (the summed delta of each layer cut back to one residual's rank by SVD, as LoRA
    merging tools do),
  - LAG with both concepts (each residual masked by its own words; overlaps go to the stronger attention).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from personalized_residuals.residual_core import CallLayout, Concept, LagSession, ResidualSet, TrainConfig, attach, locate_concept
from personalized_residuals.residual_core.residual import LowRankResidual

from . import methods
from .world import oracle
from .world.concepts import Concept as WorldConcept
from .world.model import to_latent
from .world.scenes import COLOR_NAMES, distinct_colors, render

IDS = ("sks", "zwx")
IMAGES = 4
LAG_RULE = ("max_fraction", 0.5)


def pairs_of(concepts: list[WorldConcept]) -> list[tuple[WorldConcept, WorldConcept]]:
    """Every pair of concepts of different classes, at most four, in a fixed order."""
    out = [(a, b) for i, a in enumerate(concepts) for b in concepts[i + 1:] if a.class_word != b.class_word]
    return out[:4]


def merged(a: ResidualSet, b: ResidualSet) -> ResidualSet:
    """Per layer, dW_a + dW_b cut to dW_a's rank by SVD: one residual file holding both concepts."""
    layers = {}
    for key, la in a.layers.items():
        delta = la.weight_delta() + b.layers[key].weight_delta()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = la.rank
        layer = LowRankResidual(delta.shape[0], delta.shape[1], r, la.conv)
        with torch.no_grad():
            layer.up.copy_(u[:, :r] * s[:r])
            layer.down.copy_(vh[:r])
        layers[key] = layer
    return ResidualSet(layers, a.meta)


def bleed(reading: oracle.Reading, onto: WorldConcept, source: WorldConcept) -> float | None:
    """Share of the pixels of `onto`'s object that show colours only `source` has (None: no such object)."""
    thing = reading.find(onto.class_word)
    foreign = [COLOR_NAMES.index(c) for c in source.colors - onto.colors]
    if thing is None or not foreign:
        return None
    return float(np.isin(reading.labels[thing.mask], foreign).mean())


VARIANTS = ("base model (class words)", "both residuals, global", "merged residual", "both residuals, LAG")


def _variant(name: str, trained: list[ResidualSet], tokenize, caption: str) -> list[Concept] | None:
    """The concepts to attach for a variant (None: the base model alone)."""
    if name == VARIANTS[1]:
        return [Concept(r) for r in trained]
    if name == VARIANTS[2]:
        return [Concept(merged(*trained))]
    if name == VARIANTS[3]:
        out = []
        for r in trained:
            found = locate_concept(tokenize, caption, r.meta.identifier, r.meta.class_word)
            out.append(Concept(r, 1.0, LagSession(found.positions, found.prompt_tokens, *LAG_RULE)))
        return out
    return None


def run_pairs(model, concepts: list[WorldConcept], seeds: list[int], lr: float, rank_fraction: float, log=print,
              shown: dict | None = None) -> list[dict]:
    rows = []
    for a, b in pairs_of(concepts):
        rng = random.Random(f"{a.name}+{b.name}")
        backgrounds = (rng.sample(distinct_colors(a.colors | b.colors), len(distinct_colors(a.colors | b.colors))) * 2)[:2]
        captions = [f"a {IDS[0]} {a.class_word} and a {IDS[1]} {b.class_word} on a {bg} background" for bg in backgrounds]
        for seed in seeds:
            config = TrainConfig(steps=150, batch_size=4, lr=lr, seed=seed)
            trained = [methods.residuals(model, to_latent(render(c.references())).to(model.device),
                                         [f"a {ident} {c.class_word}"], config, rank_fraction).layers
                       for c, ident in ((a, IDS[0]), (b, IDS[1]))]
            for r, c, ident in zip(trained, (a, b), IDS, strict=True):
                r.meta.identifier, r.meta.class_word = ident, c.class_word
            sample_seeds = [1000 * seed + k for k in range(IMAGES)]
            rows_caps = [c for c in captions for _ in sample_seeds]
            for name in VARIANTS:
                chosen = _variant(name, trained, model.tokenize, captions[0])  # new LAG sessions per run
                if chosen is None:
                    base_caps = [c.replace(f"{IDS[0]} ", "").replace(f"{IDS[1]} ", "") for c in rows_caps]
                    images = model.sample(base_caps, sample_seeds * len(captions))
                else:
                    images = model.sample(rows_caps, sample_seeds * len(captions),
                                          patch=lambda chosen=chosen: attach(model.unet, chosen, call=CallLayout([1, 0])))
                if shown is not None and seed == seeds[0] and (a, b) == pairs_of(concepts)[0]:
                    shown[name] = images[::IMAGES]
                readings = oracle.read_images(images)
                ia = [oracle.identity(r, a)[0] for r in readings]
                ib = [oracle.identity(r, b)[0] for r in readings]
                bleeds = [v for r in readings for v in (bleed(r, b, a), bleed(r, a, b)) if v is not None]
                row = {"variant": name, "pair": f"{a.name} + {b.name}", "seed": seed,
                       "identity_a": float(np.mean(ia)), "identity_b": float(np.mean(ib)),
                       "bleeding": float(np.mean(bleeds)) if bleeds else float("nan"),
                       "bleed_rate": float(np.mean([v > 0.2 for v in bleeds])) if bleeds else float("nan"),
                       "both_present": float(np.mean([r.find(a.class_word) is not None and r.find(b.class_word) is not None
                                                      for r in readings]))}
                rows.append(row)
                log(f"pair {row['pair']} seed {seed} {name}: identity {row['identity_a']:.3f} / {row['identity_b']:.3f}, "
                    f"bleeding {row['bleeding']:.3f}")
    return rows


PAIR_METRICS = [("identity_a", "identity, concept A (sks)"), ("identity_b", "identity, concept B (zwx)"),
                ("bleeding", "bleeding (share of an object in the other's colours)"),
                ("bleed_rate", "objects with > 20% bleeding"), ("both_present", "both objects drawn")]


def pairs_table(rows: list[dict]) -> str:
    lines = ["| variant | " + " | ".join(label for _, label in PAIR_METRICS) + " |",
             "|" + "---|" * (len(PAIR_METRICS) + 1)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        seeds = sorted({r["seed"] for r in mine})
        cells = []
        for key, _ in PAIR_METRICS:
            per_seed = [np.nanmean([r[key] for r in mine if r["seed"] == s]) for s in seeds]
            cells.append(f"{np.mean(per_seed):.3f} ± {np.std(per_seed):.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
