"""Attention-guided training in the evaluation world: does Break-A-Scene's cross-attention loss (the concept's
words kept attending inside the subject's mask while training; residual_core/attention_loss.py) make LAG lose
less identity against the global residual, and two concepts in one image bleed less?

    python -m bench.attention_training --quick --weights 0.01,0.1,1 --no-pairs   # the weight sweep: 1 concept, seed 0
    python -m bench.attention_training --weights 0.1     # 3 concepts x 3 seeds and the pairs -> bench/results/
                                                         # attention_training.json, attention_training.md
    python -m bench.attention_training --quick --weights 0.1   # 1 concept, 1 pair, seed 0: sizes the full run

Run with OMP_NUM_THREADS=1 on a shared CPU machine.

(a) Per concept, as bench.masked_loss: references show the concept beside the same other object
(masked_loss.references_with_company), the residual is trained with the masked loss (the renderer's masks),
and with the masked loss + the attention loss at each weight; same seeds, rank fraction, learning rate, 150
steps at batch 4. Each is sampled globally and with LAG (max_fraction 0.5) and scored as bench.evaluate does;
'LAG identity loss' is 1 - LAG identity / global identity (per seed, concepts averaged first); 'attention
MSE' is the attention loss (unweighted) of the trained residual on its references at fixed noise and
timesteps: how far the words' attention lies from the subject after training.
(b) Pairs, as bench.pairs (pairs of different classes among the concepts, 'a sks <A> and a zwx <B> on a
<colour> background'): residuals trained on c.references() with the masked loss (masks: the scenes' shapes),
with and without the attention loss, sampled with both residuals global and with LAG warmup (the default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from personalized_residuals.residual_core import Concept as Attached
from personalized_residuals.residual_core import (
    ResidualSet,
    TrainConfig,
    attach,
    find_targets,
    latent_masks,
    locate_concept,
    train_residual,
)
from personalized_residuals.residual_core.attention_loss import AttentionLoss

from . import methods, pairs
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
from .masked_loss import N_REFERENCES, extra_object, references_with_company
from .methods import Trained
from .world.concepts import Concept, evaluated_concepts
from .world.model import WorldModel, start_run, to_latent
from .world.scenes import SHAPES, render, shape_mask

LAG = ("max_fraction", 0.5)
PAIR_VARIANTS = (pairs.BASE, pairs.GLOBAL, "LAG warmup")
METRICS = [("identity", "identity (oracle)"), ("identity_hit", "identity hits"), ("locality", "locality"),
           ("fidelity_background", "fidelity: new bg"), ("fidelity_two_objects", "fidelity: 2 objects"),
           ("extra_object", "extra object"), ("attention_mse", "attention MSE")]
PROBE_T = (150, 400, 650, 900)  # timesteps of the attention probe


def scene_masks(scenes) -> torch.Tensor:
    """[n, 32, 32]: the first object of each scene (the concept in its references)."""
    t = torch.tensor
    return torch.stack([shape_mask(t(SHAPES.index(o.shape)), t(o.cx), t(o.cy), t(o.r)).float()
                        for o in (s.objects[0] for s in scenes)])


def loss_name(weight: float | None) -> str:
    return "masked loss" if weight is None else f"masked + attention {weight:g}"


def train(model: WorldModel, latents, masks, caption: str, identifier: str, class_word: str, config: TrainConfig,
          weight: float | None) -> Trained:
    """masked_loss.train with the attention loss at `weight` (None: the masked loss alone)."""
    residual = ResidualSet.for_targets(find_targets(model.unet), RANK_FRACTION, seed=config.seed)
    positions = locate_concept(model.tokenize, caption, identifier, class_word).positions
    guide = None if weight is None else AttentionLoss(model.unet, positions, weight)
    started = time.perf_counter()
    train_residual(residual, model.unet, model.denoiser(model.text.encode([caption])), latents, model.alphas_cumprod,
                   model.prediction, config, masks=masks, attention_loss=guide)
    seconds = time.perf_counter() - started
    residual.meta.identifier, residual.meta.class_word = identifier, class_word
    return Trained(model, lambda c: lambda: attach(model.unet, [Attached(residual)]), residual.num_parameters(), 0,
                   seconds, residual)


@torch.no_grad()
def attention_mse(model: WorldModel, trained: Trained, latents, masks, caption: str, identifier: str,
                  class_word: str) -> float:
    """The unweighted attention loss of the trained residual on its references, at fixed noise and PROBE_T."""
    positions = locate_concept(model.tokenize, caption, identifier, class_word).positions
    probe = AttentionLoss(model.unet, positions, 1.0)
    context = model.text.encode([caption])
    g = torch.Generator().manual_seed(0)
    values = []
    m = latent_masks(masks.to(latents.device), tuple(latents.shape[-2:]))  # the training's target
    for t in PROBE_T:
        eps = torch.randn(latents.shape, generator=g).to(latents.device)
        a = model.alphas_cumprod[t]
        x_t = a.sqrt() * latents + (1 - a).sqrt() * eps
        with trained.patch(caption)(), probe.recording():
            model.unet(x_t, torch.full((len(latents),), t, device=latents.device), context.expand(len(latents), -1, -1))
        values.append(float(probe(m)))
    return float(np.mean(values))


def run_concepts(model, concepts: list[Concept], seeds: list[int], lr: float, weights: list[float | None],
                 log=print) -> list[dict]:
    rows = []
    for concept in concepts:
        scenes, masks, other = references_with_company(concept)
        references = render(scenes)
        latents = to_latent(references).to(model.device)
        prompts, caption = concept_prompts(concept), f"a {IDENTIFIER} {concept.class_word}"
        for seed in seeds:
            sample_seeds = [1000 * seed + k for k in range(IMAGES)]
            base = sample_prompts(None, model, prompts, sample_seeds, base=True)
            for weight in weights:
                config = TrainConfig(steps=STEPS, batch_size=BATCH, lr=lr, seed=seed)
                trained = train(model, latents, masks, caption, IDENTIFIER, concept.class_word, config, weight)
                probe = attention_mse(model, trained, latents, masks, caption, IDENTIFIER, concept.class_word)
                for how, sampled in (("global", trained), ("LAG", methods.with_lag(trained, IDENTIFIER,
                                                                                   concept.class_word, *LAG))):
                    images = sample_prompts(sampled, model, prompts, sample_seeds)
                    row = {"training": loss_name(weight), "weight": weight, "sampling": how, "concept": concept.name,
                           "seed": seed, **score(concept, images, base, None, references),
                           "extra_object": extra_object(images, other), "attention_mse": probe,
                           "seconds": trained.seconds}
                    rows.append(row)
                    log(f"{concept.name} seed {seed} {loss_name(weight)}, {how}: identity {row['identity']:.3f} "
                        f"locality {row['locality']:.3f} extra object {row['extra_object']:.2f} attention MSE "
                        f"{probe:.4f} ({trained.seconds:.1f} s training)")
    return rows


def _per_seed(rows: list[dict], key: str) -> list[float]:
    return [float(np.mean([r[key] for r in rows if r["seed"] == s])) for s in sorted({r["seed"] for r in rows})]


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per training and sampling: each metric averaged over concepts per seed, then mean and std over seeds;
    per training, the LAG identity loss 1 - LAG / global identity (per seed)."""
    out = {}
    for training in dict.fromkeys(r["training"] for r in rows):
        for how in ("global", "LAG"):
            mine = [r for r in rows if r["training"] == training and r["sampling"] == how]
            out[f"{training}, {how}"] = {k: (float(np.mean(v := _per_seed(mine, k))), float(np.std(v)))
                                         for k, _ in METRICS}
        glob = _per_seed([r for r in rows if r["training"] == training and r["sampling"] == "global"], "identity")
        lag = _per_seed([r for r in rows if r["training"] == training and r["sampling"] == "LAG"], "identity")
        loss = [1 - lg / gl for lg, gl in zip(lag, glob, strict=True)]
        out[f"{training}, LAG"]["lag_identity_loss"] = (float(np.mean(loss)), float(np.std(loss)))
    return out


def concept_table(summary: dict[str, dict]) -> str:
    lines = ["| training, sampling | " + " | ".join(label for _, label in METRICS) + " | LAG identity loss vs global |",
             "|" + "---|" * (len(METRICS) + 2)]
    for name, s in summary.items():
        loss = s.get("lag_identity_loss")
        lines.append(f"| {name} | " + " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k, _ in METRICS)
                     + (f" | {100 * loss[0]:.0f}% ± {100 * loss[1]:.0f}% |" if loss else " | |"))
    return "\n".join(lines)


def prefill(model, pool: list[Concept], seeds: list[int], lr: float, weight: float | None, log=print) -> dict:
    """run_pairs' cache for every (concept, identifier, seed) its pairs use, trained with masks (and the
    attention loss at `weight`)."""
    cache = {}
    for group in pairs.pairs_of(pool):
        for c, ident in zip(group, pairs.IDS, strict=False):
            scenes = c.references()
            latents, masks = to_latent(render(scenes)).to(model.device), scene_masks(scenes)
            for seed in seeds:
                if (c.name, ident, seed) not in cache:
                    config = TrainConfig(steps=150, batch_size=4, lr=lr, seed=seed)
                    trained = train(model, latents, masks, f"a {ident} {c.class_word}", ident, c.class_word, config,
                                    weight)
                    cache[(c.name, ident, seed)] = trained.layers
                    log(f"pairs: trained {c.name} ({ident}) seed {seed}, {loss_name(weight)} ({trained.seconds:.1f} s)")
    return cache


def run_pairs(model, pool, seeds, lr, weights, log=print) -> list[dict]:
    rows = []
    for i, weight in enumerate(weights):
        cache = prefill(model, pool, seeds, lr, weight, log)
        variants = PAIR_VARIANTS if i == 0 else PAIR_VARIANTS[1:]  # the base model once
        for r in pairs.run_pairs(model, pool, seeds, lr, RANK_FRACTION, log=log, variants=variants, cache=cache):
            training = "" if r["variant"] == pairs.BASE else f"{loss_name(weight)}: "
            rows.append(r | {"training": loss_name(weight), "weight": weight, "variant": training + r["variant"]})
    return rows


def pairs_summary(rows: list[dict], weights) -> list[str]:
    """Per training: LAG warmup minus the global residuals (bleeding, all drawn, identity A and B)."""
    mean = {(r, k): float(np.mean(pairs._per_seed(rows, r, k))) for r in {x["variant"] for x in rows}
            for k in ("bleeding", "both_present", "identity_a", "identity_b")}
    lines = ["| training | LAG warmup bleeding | - global | LAG all drawn | - global | LAG identity A, B | - global |",
             "|---|---|---|---|---|---|---|"]
    for weight in weights:
        g, lag = f"{loss_name(weight)}: {pairs.GLOBAL}", f"{loss_name(weight)}: LAG warmup"

        def cell(k, g=g, lag=lag):
            return f"{mean[(lag, k)]:.3f}", f"{mean[(lag, k)] - mean[(g, k)]:+.3f}"

        (bl, dbl), (dr, ddr), (ia, dia), (ib, dib) = (cell(k) for k in ("bleeding", "both_present", "identity_a",
                                                                        "identity_b"))
        lines.append(f"| {loss_name(weight)} | {bl} | {dbl} | {dr} | {ddr} | {ia}, {ib} | {dia}, {dib} |")
    return lines


def verdict(summary: dict, pair_rows: list[dict], weight: float | None) -> str:
    """Against the masked loss alone, it pays when LAG identity rises by more than the seeds' spread, or LAG's
    identity loss against global falls by more than its spread with LAG identity not lower; and (with pairs)
    LAG warmup bleeds no more and draws all objects no less often."""
    base, guided = summary["masked loss, LAG"], summary[f"{loss_name(weight)}, LAG"]
    d_loss = guided["lag_identity_loss"][0] - base["lag_identity_loss"][0]
    loss_spread = max(guided["lag_identity_loss"][1], base["lag_identity_loss"][1])
    d_ident = guided["identity"][0] - base["identity"][0]
    ident_spread = max(guided["identity"][1], base["identity"][1])
    checks = [d_ident > ident_spread or (d_loss < -loss_spread and d_ident >= 0)]
    text = (f"LAG identity {d_ident:+.3f} (seeds' spread {ident_spread:.3f}), LAG identity loss vs global "
            f"{100 * d_loss:+.0f} points (spread {100 * loss_spread:.0f})")
    if pair_rows:
        def m(v, k):
            return float(np.mean(pairs._per_seed(pair_rows, v, k)))
        a, b = "masked loss: LAG warmup", f"{loss_name(weight)}: LAG warmup"
        d_bleed, d_drawn = m(b, "bleeding") - m(a, "bleeding"), m(b, "both_present") - m(a, "both_present")
        checks += [d_bleed <= 0, d_drawn >= 0]
        text += f", pairs (LAG warmup) bleeding {d_bleed:+.3f}, all drawn {d_drawn:+.3f}"
    return (f"**Does it pay? {'Yes' if all(checks) else 'No'}** (attention weight {weight:g} against the masked loss "
            f"alone: {text}. Rule: LAG identity up by more than the spread, or the identity loss down by more than "
            "its spread with LAG identity not lower; and with pairs, bleeding not up and all drawn not down.)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--concepts", type=int, default=3, help="the first N evaluated concepts")
    ap.add_argument("--weights", default="0.1", help="attention-loss weights, comma-separated")
    ap.add_argument("--quick", action="store_true", help="1 concept (and 1 pair), seed 0")
    ap.add_argument("--no-pairs", action="store_true", help="the per-concept comparison only")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    run = start_run(args.out)
    out, model = run.out, run.model
    evaluated = evaluated_concepts()[:args.concepts]
    seeds = list(range(1 if args.quick else args.seeds))
    weights = [None, *(float(w) for w in args.weights.split(","))]
    lr = residual_lr()
    log = lambda s: print(s, flush=True)  # noqa: E731
    shown = evaluated[:1] if args.quick else evaluated
    rows = run_concepts(model, shown, seeds, lr, weights, log)
    summary = summarize(rows)
    table = concept_table(summary)
    print(table, flush=True)
    pair_rows, pool = [], list(pairs.pairs_of(evaluated)[0]) if args.quick else evaluated
    if not args.no_pairs:
        pair_rows = run_pairs(model, pool, seeds, lr, weights, log)
    minutes = run.minutes
    text = ["# Attention-guided training in the evaluation world\n",
            f"Command: `{' '.join(['python -m bench.attention_training', *sys.argv[1:]])}` ({minutes:.0f} min, "
            f"{torch.get_num_threads()} CPU thread(s)). Concepts: {', '.join(c.name for c in shown)}; "
            f"seeds {seeds}; {STEPS} steps at batch {BATCH}, lr {lr:g}, rank fraction {RANK_FRACTION}; attention loss "
            "(residual_core/attention_loss.py): the identifier's and class word's cross-attention in every "
            "SpatialTransformer, normalised by its maximum, MSE against the subject's (dilated latent) mask on the "
            "block's grid, averaged over blocks, times the weight, added to the masked diffusion loss. LAG: "
            f"{LAG[0]} {LAG[1]}.\n",
            f"Per concept ({N_REFERENCES} references, each the concept beside the same other object, as "
            f"bench.masked_loss; {IMAGES} images per prompt and seed; LAG rows have no non-interference, its "
            "prompts lack the identifier):\n", table, ""]
    for weight in weights[1:]:
        text.append(verdict(summary, pair_rows, weight) + "\n")
    if pair_rows:
        text += [f"Pairs ({', '.join(' + '.join(c.name for c in g) for g in pairs.pairs_of(pool))}; residuals trained "
                 "on each concept's own references with the masked loss, with and without the attention loss; "
                 f"{pairs.IMAGES} images x 2 backgrounds per seed):\n", pairs.pairs_table(pair_rows), "",
                 *pairs_summary(pair_rows, weights), ""]
    md = "\n".join(text)
    print(md, flush=True)
    if args.quick:
        return
    (out / "attention_training.json").write_text(json.dumps(
        {"lr": lr, "weights": weights, "minutes": minutes, "rows": rows, "summary": summary, "pairs": pair_rows},
        indent=1))
    (out / "attention_training.md").write_text(md)
    print(f"wrote {out}/attention_training.json, attention_training.md ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
