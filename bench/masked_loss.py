"""Masked loss in the evaluation world: does training on the subject only stop a residual learning the photos'
backgrounds, without costing identity?

    python -m bench.masked_loss            # 5 concepts x 3 seeds -> bench/results/masked_loss.json, masked_loss.md
    python -m bench.masked_loss --concepts 3   # the first 3 concepts x 3 seeds
    python -m bench.masked_loss --quick    # 1 concept, 1 seed: sizes the full run

References here are not the concept alone: each photo shows it on a varied background colour beside the
same other object (a 'sofa' in every photo: a fixed shape and colour far from the concept's, at a random
place), as a user's photos of a pet tend to share a room. The same residual (rank fraction, learning rate,
150 steps at batch 4, seed) is trained without masks and with the concept's exact masks (the renderer's
own shape masks; masked loss as the node does it: residual_core.fit's masks), then scored as bench.evaluate
scores every method: identity, fidelity, locality (outside the concept, against the base model at the same
seed) and non-interference (prompts without the identifier). 'extra object' is the share of trigger-prompt
images that show the references' other object (shape and colour) where the prompt did not ask for it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np
import torch
from personalized_residuals.residual_core import Concept as Attached
from personalized_residuals.residual_core import ResidualSet, TrainConfig, attach, find_targets, train_residual

from .evaluate import (
    BATCH,
    IDENTIFIER,
    IMAGES,
    RANK_FRACTION,
    RESULTS,
    STEPS,
    concept_prompts,
    residual_lr,
    sample_prompts,
    score,
)
from .methods import Trained
from .world import oracle
from .world.concepts import Concept, evaluated_concepts
from .world.model import WorldModel, start_run, to_latent
from .world.scenes import SHAPES, Obj, Scene, distinct_colors, place, render, shape_mask

N_REFERENCES = 5
METRICS = [("identity", "identity (oracle)"), ("identity_hit", "identity hits"), ("fidelity_background", "fidelity: new bg"),
           ("fidelity_two_objects", "fidelity: 2 objects"), ("locality", "locality"),
           ("non_interference", "non-interference"), ("extra_object", "extra object")]


def references_with_company(concept: Concept, n: int = N_REFERENCES, seed: int = 0):
    """(scenes, masks [n, 32, 32], the other object's (shape, colour)): the concept beside the same other object,
    on varied backgrounds; masks are the concept's exact pixels."""
    rng = random.Random(f"{concept.name}-company-{seed}")
    free = distinct_colors(concept.colors)
    other_shape = rng.choice([s for s in SHAPES if s != concept.class_word])
    other_color = rng.choice(free)
    scenes, masks = [], []
    for _ in range(n):
        background = rng.choice([c for c in free if c != other_color])
        slot = rng.randrange(2)
        obj = concept.obj(*place(rng, 2, slot))
        other = Obj(other_shape, other_color, *place(rng, 2, 1 - slot), identifier=None)
        scenes.append(Scene(background, [obj, other]))
        t = torch.tensor
        masks.append(shape_mask(t(SHAPES.index(obj.shape)), t(obj.cx), t(obj.cy), t(obj.r)).float())
    return scenes, torch.stack(masks), (other_shape, other_color)


def train(model: WorldModel, latents, masks, caption: str, config: TrainConfig) -> Trained:
    residual = ResidualSet.for_targets(find_targets(model.unet), RANK_FRACTION, seed=config.seed)
    started = time.perf_counter()
    train_residual(residual, model.unet, model.denoiser(model.text.encode([caption])), latents, model.alphas_cumprod,
                   model.prediction, config, masks=masks)
    seconds = time.perf_counter() - started
    return Trained(model, lambda c: lambda: attach(model.unet, [Attached(residual)]), residual.num_parameters(), 0,
                   seconds, residual)


def extra_object(images: dict, other: tuple[str, str]) -> float:
    """Share of trigger-prompt images showing the references' other object that the prompt did not ask for."""
    found = [r.find(*other) is not None for p, imgs in images.items() if p.kind != "plain" and p.other != other
             for r in oracle.read_images(imgs)]
    return float(np.mean(found))


def run(model, concepts, seeds, lr, log=print) -> list[dict]:
    rows = []
    for concept in concepts:
        scenes, masks, other = references_with_company(concept)
        latents = to_latent(render(scenes)).to(model.device)
        references = render(scenes)
        prompts, caption = concept_prompts(concept), f"a {IDENTIFIER} {concept.class_word}"
        for seed in seeds:
            sample_seeds = [1000 * seed + k for k in range(IMAGES)]
            base = sample_prompts(None, model, prompts, sample_seeds, base=True)
            rows.append({"method": "base model (class word)", "concept": concept.name, "seed": seed,
                         **score(concept, base, base, None, references), "extra_object": extra_object(base, other)})
            for name, m in (("residuals, whole photo", None), ("residuals, masked loss", masks)):
                config = TrainConfig(steps=STEPS, batch_size=BATCH, lr=lr, seed=seed)
                trained = train(model, latents, m, caption, config)
                images = sample_prompts(trained, model, prompts, sample_seeds)
                row = {"method": name, "concept": concept.name, "seed": seed, **score(concept, images, base, None,
                                                                                       references),
                       "extra_object": extra_object(images, other), "seconds": trained.seconds}
                rows.append(row)
                log(f"{concept.name} seed {seed} {name}: identity {row['identity']:.3f} locality {row['locality']:.3f} "
                    f"non-interference {row['non_interference']:.3f} extra object {row['extra_object']:.2f} "
                    f"({trained.seconds:.1f} s)")
    return rows


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per method: each metric averaged over concepts per seed, then mean and std over seeds."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = sorted({r["seed"] for r in mine})
        out[method] = {k: (float(np.mean(per := [np.mean([r[k] for r in mine if r["seed"] == s]) for s in seeds])),
                           float(np.std(per))) for k, _ in METRICS}
    return out


def markdown_table(summary: dict[str, dict]) -> str:
    lines = ["| method | " + " | ".join(label for _, label in METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
    for method, s in summary.items():
        lines.append(f"| {method} | " + " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k, _ in METRICS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--concepts", type=int, default=0, help="only the first N evaluated concepts (0: all)")
    ap.add_argument("--quick", action="store_true", help="1 concept, 1 seed")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    run = start_run(args.out)
    out, model = run.out, run.model
    evaluated = evaluated_concepts()
    seeds = list(range(1 if args.quick else args.seeds))
    if args.quick or args.concepts:
        evaluated = evaluated[:1 if args.quick else args.concepts]
    lr = residual_lr()
    rows = run(model, evaluated, seeds, lr, log=lambda s: print(s, flush=True))
    summary = summarize(rows)
    minutes = run.minutes
    table = markdown_table(summary)
    print(table)
    if args.quick:
        return
    (out / "masked_loss.json").write_text(json.dumps({"lr": lr, "rows": rows, "summary": summary}, indent=1))
    (out / "masked_loss.md").write_text(
        f"# Masked loss in the evaluation world\n\nCommand: `{' '.join(['python -m bench.masked_loss', *sys.argv[1:]])}` "
        f"({minutes:.0f} min, {torch.get_num_threads()} CPU thread(s)). Concepts: "
        f"{', '.join(c.name for c in evaluated)}; seeds {seeds}; {N_REFERENCES} references, each "
        f"the concept beside the same other object on a varied background; {IMAGES} images per prompt and seed; "
        f"{STEPS} steps at batch {BATCH}, lr {lr:g}, rank fraction {RANK_FRACTION}.\n\n{table}\n")


if __name__ == "__main__":
    main()
