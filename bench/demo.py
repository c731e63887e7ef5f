"""The main job end to end, on a machine with no Stable Diffusion weights: personalise the evaluation world's
shipped base model to one concept and write a sample grid (base model, global residual, LAG) to a PNG.

    python -m bench.demo [--concept twotone_circle] [--out demo.png]

The same residual_core code the ComfyUI nodes run: low-rank residuals on every proj_out, trained for 150
steps at batch 4, then sampled globally and with LAG. A few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from personalized_residuals.residual_core import TrainConfig

from . import methods
from .evaluate import IDENTIFIER, RANK_FRACTION, RESULTS, concept_prompts, lag_name, sample_prompts
from .pictures import grid_png
from .world import oracle
from .world.concepts import load_concepts
from .world.model import WorldModel, to_latent
from .world.scenes import render


def progress(step: int, total: int, started: float, width: int = 30) -> None:
    done = int(width * step / total)
    sys.stdout.write(f"\rtraining [{'#' * done}{'.' * (width - done)}] {step}/{total} steps, {time.time() - started:.0f} s")
    if step == total:
        sys.stdout.write("\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="twotone_circle")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="demo.png")
    args = ap.parse_args()
    started = time.time()
    concepts, _ = load_concepts()
    concept = concepts[args.concept]
    model = WorldModel.load()
    lrs = RESULTS / "learning_rates.json"
    lr = json.loads(lrs.read_text())["chosen"]["residuals"] if lrs.exists() else 1e-3
    references = render(concept.references())
    print(f"concept '{concept.name}': a {concept.class_word} with pattern {concept.pattern}; "
          f"{len(references)} reference renders; prompt 'a {IDENTIFIER} {concept.class_word}'")
    config = TrainConfig(steps=args.steps, batch_size=4, lr=lr, seed=args.seed)
    train_started = time.time()
    trained = methods.residuals(model, to_latent(references), [f"a {IDENTIFIER} {concept.class_word}"], config,
                                RANK_FRACTION, on_step=lambda step, losses: progress(step + 1, args.steps, train_started))
    print(f"{trained.parameters:,} trainable parameters, {trained.file_bytes / 1024:.0f} KB file, "
          f"{trained.seconds:.1f} s")
    prompts = [p for p in concept_prompts(concept) if p.kind != "plain"]
    seeds = [args.seed]
    base = sample_prompts(None, model, prompts, seeds, base=True)
    lagged = methods.with_lag(trained, IDENTIFIER, concept.class_word, "max_fraction", 0.5)
    rows = {"base model (class word)": base, "residual, global": sample_prompts(trained, model, prompts, seeds),
            lag_name("max_fraction", 0.5): sample_prompts(lagged, model, prompts, seeds)}
    for name, images in rows.items():
        scores = [oracle.identity(r, concept)[0] for imgs in images.values() for r in oracle.read_images(imgs)]
        print(f"{name}: oracle identity {sum(scores) / len(scores):.2f}")
    grid_png(Path(args.out), {k: {p: imgs[0] for p, imgs in v.items()} for k, v in rows.items()}, prompts, references,
             f"{concept.name}: base vs personalized residual, seed {args.seed}")
    print(f"wrote {args.out} ({time.time() - started:.0f} s in all, {torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    main()
