"""Two (or three) concepts in one image: does each keep its own look, and does one bleed onto another?

    python -m bench.pairs                 # 4 pairs x 3 seeds, every variant -> bench/results/pairs.json, the
                                          # section "Two concepts in one image" of report.md, pairs_grid.png
    python -m bench.pairs --triples       # also three concepts of three classes in one prompt
    python -m bench.pairs --only-triples  # the triples alone, joined to the pairs.json already in --out
    python -m bench.pairs --quick         # one pair, one seed: sizes the full run (3 min)

Run with OMP_NUM_THREADS=1 on a shared CPU machine: more threads than free cores stall it.

For groups of concepts of different classes (A with identifier 'sks', B 'zwx', C 'qpv'), each residual is
trained on its own photos, then prompts such as "a sks square and a zwx circle on a green background"
are sampled at the same seeds by every variant:
  - base model (class words only),
  - both residuals applied globally (their deltas summed),
  - one merged residual (the summed delta of each layer cut back to one residual's rank by SVD, as LoRA
    merging tools do),
  - LAG with every concept, one row per mask strategy (residual_core/masks.py): each residual masked by its
    own words; overlaps go to the stronger relative attention, so masks never overlap. "freefuse, restart"
    is FreeFuse's two passes: sampling stops once the masks are fixed, then starts again from the noise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from personalized_residuals.residual_core import CallLayout, Concept, LagSession, ResidualSet, TrainConfig, attach, locate_concept
from personalized_residuals.residual_core.residual import LowRankResidual

from . import methods
from .world import oracle
from .world.concepts import Concept as WorldConcept
from .world.model import WorldRun, start_run, to_latent
from .world.scenes import COLOR_NAMES, IDENTIFIERS, MAX_WORDS, distinct_colors, render
from .world.unet import attention_override

IDS = IDENTIFIERS[:3]
IMAGES = 4
LAG_RULE = ("max_fraction", 0.5)
RESULTS = Path(__file__).resolve().parent / "results"


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


GLOBAL, MERGED = "both residuals, global", "merged residual"
BASE = "base model (class words)"
# LAG variants: row name -> mask strategy ("freefuse, restart": FreeFuse's masks from a first pass)
STRATEGY_VARIANTS = {"both residuals, LAG": "per_block", "LAG shared": "shared", "LAG lorashop": "lorashop",
                     "LAG freefuse": "freefuse", "LAG freefuse, restart": "freefuse", "LAG ema": "ema",
                     "LAG warmup": "warmup", "LAG shared+ema": "shared+ema", "LAG shared+warmup": "shared+warmup",
                     "LAG lorashop+warmup": "lorashop+warmup", "LAG ema+warmup": "ema+warmup",
                     "LAG warmup 5": "warmup5", "LAG warmup 8": "warmup8", "LAG bias": "bias",
                     "LAG warmup+bias": "warmup+bias", "LAG warmup 8+bias": "warmup8+bias"}
VARIANTS = (BASE, GLOBAL, MERGED, *STRATEGY_VARIANTS)


def merged_all(trained: list[ResidualSet]) -> ResidualSet:
    out = trained[0]
    for r in trained[1:]:
        out = merged(out, r)
    return out


class _Fixed(Exception):
    """FreeFuse's first pass is over: every concept's masks are fixed."""


@contextmanager
def _step(unet, sessions: list[LagSession], chosen: list[Concept], stop_when_fixed: bool):
    """One UNet call of WorldModel.sample (one per step, batched [uncond; cond]): a model evaluation."""
    for s in sessions:
        s.begin_evaluation()
    with attach(unet, chosen, call=CallLayout([1, 0])) as attached, attention_override(unet, attached.attention_override):
        yield
    if stop_when_fixed and all(s.strategy.fixed for s in sessions):
        raise _Fixed


def sample_variant(model, name: str, trained: list[ResidualSet], captions: list[str], seeds: list[int]
                   ) -> torch.Tensor:
    """Images for captions x seeds (each caption repeated for every seed), one variant."""
    rows_caps = [c for c in captions for _ in seeds]
    all_seeds = seeds * len(captions)
    if name == BASE:
        plain = rows_caps
        for ident in IDS:
            plain = [c.replace(f"{ident} ", "") for c in plain]
        return model.sample(plain, all_seeds)
    if name in (GLOBAL, MERGED):
        chosen = [Concept(r) for r in trained] if name == GLOBAL else [Concept(merged_all(trained))]
        return model.sample(rows_caps, all_seeds, patch=lambda: attach(model.unet, chosen, call=CallLayout([1, 0])))
    strategy = STRATEGY_VARIANTS[name]
    sessions = []
    for r in trained:  # every caption names the concepts at the same positions
        found = locate_concept(model.tokenize, captions[0], r.meta.identifier, r.meta.class_word)
        sessions.append(LagSession(found.positions, found.prompt_tokens, *LAG_RULE, strategy=strategy))
    chosen = [Concept(r, 1.0, s) for r, s in zip(trained, sessions, strict=True)]
    if name.endswith("restart"):  # first pass up to the step the masks are fixed at, then sample afresh
        try:
            model.sample(rows_caps, all_seeds, patch=lambda: _step(model.unet, sessions, chosen, True))
        except _Fixed:
            pass
        for s in sessions:
            s.strategy.restart()
            s.reset()
    return model.sample(rows_caps, all_seeds, patch=lambda: _step(model.unet, sessions, chosen, False))


def groups_of(concepts: list[WorldConcept], size: int) -> list[tuple[WorldConcept, ...]]:
    """Pairs (size 2): every pair of concepts of different classes, at most four, in a fixed order. Triples:
    every three concepts of three classes, at most four."""
    if size == 2:
        return pairs_of(concepts)
    out = [(a, b, c) for i, a in enumerate(concepts) for j, b in enumerate(concepts[i + 1:], i + 1)
           for c in concepts[j + 1:] if len({a.class_word, b.class_word, c.class_word}) == 3]
    return out[:4]


def run_pairs(model, concepts: list[WorldConcept], seeds: list[int], lr: float, rank_fraction: float, log=print,
              shown: dict | None = None, size: int = 2, variants=VARIANTS, cache: dict | None = None) -> list[dict]:
    """Every variant on every group (pairs, or triples with size 3) and seed. cache: trained residuals by
    (concept, identifier, seed), kept between groups within the run."""
    cache = {} if cache is None else cache
    rows = []
    groups = groups_of(concepts, size)
    for group in groups:
        names = " + ".join(c.name for c in group)
        rng = random.Random("+".join(c.name for c in group))
        used = set().union(*(c.colors for c in group))
        backgrounds = (rng.sample(distinct_colors(used), len(distinct_colors(used))) * 2)[:2]
        lead = " and ".join(f"a {ident} {c.class_word}" for c, ident in zip(group, IDS, strict=False))
        captions = [f"{lead} on a {bg} background" for bg in backgrounds]
        per_caption = IMAGES
        if len(captions[0].split()) > MAX_WORDS:  # three objects and a background don't fit the world's captions
            captions, per_caption = [lead], 2 * IMAGES
        for seed in seeds:
            config = TrainConfig(steps=150, batch_size=4, lr=lr, seed=seed)
            trained = []
            for c, ident in zip(group, IDS, strict=False):
                key = (c.name, ident, seed)
                if key not in cache:
                    r = methods.residuals(model, to_latent(render(c.references())).to(model.device),
                                          [f"a {ident} {c.class_word}"], config, rank_fraction).layers
                    r.meta.identifier, r.meta.class_word = ident, c.class_word
                    cache[key] = r
                trained.append(cache[key])
            sample_seeds = [1000 * seed + k for k in range(per_caption)]
            for name in variants:
                started = time.perf_counter()
                images = sample_variant(model, name, trained, captions, sample_seeds)
                seconds = time.perf_counter() - started
                if shown is not None and seed == seeds[0] and group == groups[0]:
                    shown[name] = images[::per_caption]
                readings = oracle.read_images(images)
                idents = [float(np.mean([oracle.identity(r, c)[0] for r in readings])) for c in group]
                bleeds = [v for r in readings for c in group for o in group if o is not c
                          for v in (bleed(r, c, o),) if v is not None]
                row = {"variant": name, "pair": names, "size": size, "seed": seed, "seconds": seconds,
                       "identity_a": idents[0], "identity_b": idents[1],
                       "bleeding": float(np.mean(bleeds)) if bleeds else float("nan"),
                       "bleed_rate": float(np.mean([v > 0.2 for v in bleeds])) if bleeds else float("nan"),
                       "both_present": float(np.mean([all(r.find(c.class_word) is not None for c in group)
                                                      for r in readings]))}
                if size == 3:
                    row["identity_c"] = idents[2]
                rows.append(row)
                log(f"{names} seed {seed} {name}: identity " + " / ".join(f"{v:.3f}" for v in idents)
                    + f", bleeding {row['bleeding']:.3f}, all drawn {row['both_present']:.2f} ({seconds:.1f} s)")
    return rows


PAIR_METRICS = [("identity_a", "identity, concept A (sks)"), ("identity_b", "identity, concept B (zwx)"),
                ("identity_c", "identity, concept C (qpv)"),
                ("bleeding", "bleeding (share of an object in the other's colours)"),
                ("bleed_rate", "objects with > 20% bleeding"), ("both_present", "all objects drawn")]


def _per_seed(rows: list[dict], variant: str, key: str) -> list[float]:
    mine = [r for r in rows if r["variant"] == variant and key in r]
    return [float(np.nanmean([r[key] for r in mine if r["seed"] == s])) for s in sorted({r["seed"] for r in mine})]


def pairs_table(rows: list[dict]) -> str:
    """Mean ± std over seeds (each seed averaged over groups), and sampling time against the global residuals."""
    metrics = [(k, label) for k, label in PAIR_METRICS if any(k in r for r in rows)]
    timed = all("seconds" in r for r in rows) and any(r["variant"] == GLOBAL for r in rows)
    lines = ["| variant | " + " | ".join(label for _, label in metrics) + (" | sampling time vs global |" if timed else " |"),
             "|" + "---|" * (len(metrics) + 1 + timed)]
    plain = np.mean(_per_seed(rows, GLOBAL, "seconds")) if timed else None
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for key, _ in metrics:
            per_seed = _per_seed(rows, variant, key)
            cells.append(f"{np.mean(per_seed):.3f} ± {np.std(per_seed):.3f}")
        if timed:
            cells.append(f"{np.mean(_per_seed(rows, variant, 'seconds')) / plain:.2f}x")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_table(rows: list[dict]) -> str:
    """The issue's goals per LAG variant: bleeding minus the base model's (goal <= 0.03), all objects drawn
    minus the base's (goal >= 0), identity minus the global residuals' per concept (goal >= 0)."""
    mean = {(v, k): float(np.mean(_per_seed(rows, v, k))) for v in {r["variant"] for r in rows}
            for k, _ in PAIR_METRICS if any(k in r for r in rows)}
    if (BASE, "bleeding") not in mean or (GLOBAL, "identity_a") not in mean:
        return "(the goals need the base model's and the global residuals' rows in the same run)"
    idents = [k for k in ("identity_a", "identity_b", "identity_c") if (GLOBAL, k) in mean]
    lines = ["| variant | bleeding - base (goal <= 0.03) | all drawn - base (goal >= 0) | "
             + " | ".join(f"{k[-1].upper()} identity - global (goal >= 0)" for k in idents) + " | goals met |",
             "|" + "---|" * (4 + len(idents))]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        if variant in (BASE, GLOBAL, MERGED):
            continue
        gaps = [mean[(variant, "bleeding")] - mean[(BASE, "bleeding")],
                mean[(variant, "both_present")] - mean[(BASE, "both_present")],
                *(mean[(variant, k)] - mean[(GLOBAL, k)] for k in idents)]
        met = (gaps[0] <= 0.03) + (gaps[1] >= 0) + sum(g >= 0 for g in gaps[2:])
        lines.append(f"| {variant} | " + " | ".join(f"{g:+.3f}" for g in gaps) + f" | {met} of {len(gaps)} |")
    return "\n".join(lines)


def report_section(rows: list[dict], command: str, minutes: float, triples: list[dict]) -> str:
    text = ["## Two concepts in one image", "",
            f"Command: `{command}` ({minutes:.0f} min on {torch.get_num_threads()} CPU threads). Pairs of concepts of "
            "different classes (A: identifier sks, B: zwx), each residual trained on its own photos; prompts "
            f"'a sks <A> and a zwx <B> on a <colour> background', 2 backgrounds x {IMAGES} images per seed; seeds "
            f"{sorted({r['seed'] for r in rows})}. Identity: each concept on its own object; bleeding: the share "
            "of an object's pixels in colours only another concept has. LAG rule: max_fraction 0.5; one row per "
            "mask strategy (residual_core/masks.py). Sampling time: the variant's wall time for its images over "
            "the global residuals' (same images, hooks without masks).", "",
            pairs_table(rows), "", "Against the issue's goals (means over seeds):", "", goals_table(rows), ""]
    if triples:
        text += ["Three concepts of three classes in one prompt (C: qpv): 'a sks <A> and a zwx <B> and a qpv <C>' (no "
                 f"background: the world's captions hold {MAX_WORDS} words), {2 * IMAGES} images per seed:", "",
                 pairs_table(triples), "", goals_table(triples), ""]
    text += ["![Two concepts: base, both global, merged, LAG strategies](pairs_grid.png)", ""]
    return "\n".join(text)


def write_section(report: Path, section: str) -> None:
    """Replace report.md's 'Two concepts in one image' section (up to the next '## '), keeping the rest."""
    text = report.read_text() if report.exists() else ""
    head = "## Two concepts in one image"
    if head in text:
        before, rest = text.split(head, 1)
        after = rest[rest.index("\n## "):] if "\n## " in rest else ""
        text = before + section.rstrip("\n") + "\n" + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    report.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-list", default="", help="these seeds (comma-separated) instead of 0 .. --seeds - 1")
    ap.add_argument("--quick", action="store_true", help="one pair, one seed: to size the full run")
    ap.add_argument("--triples", action="store_true", help="also three concepts of three classes")
    ap.add_argument("--variants", default="", help="variant names separated by ; (default: all)")
    ap.add_argument("--only-triples", action="store_true", help="the triples alone (a second process beside a pairs run)")
    ap.add_argument("--triple-variants", default="", help="the same for the triples (default: --variants)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for pairs.json, report.md's section, pairs_grid.png")
    args = ap.parse_args()
    from .evaluate import RANK_FRACTION, residual_lr
    from .pictures import pair_grid
    from .world.concepts import evaluated_concepts

    run = start_run(args.out)
    out, model = run.out, run.model
    evaluated = evaluated_concepts()
    lr = residual_lr()
    seeds = list(range(1 if args.quick else args.seeds))
    if args.seed_list:
        seeds = [int(v) for v in args.seed_list.split(",")]
    variants = [v.strip() for v in args.variants.split(";") if v.strip()] or list(VARIANTS)
    triple_variants = [v.strip() for v in args.triple_variants.split(";") if v.strip()] or variants
    unknown = set(variants + triple_variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    log = lambda s: print(s, flush=True)  # noqa: E731
    cache: dict = {}
    shown: dict = {}
    pool = evaluated if not args.quick else list(pairs_of(evaluated)[0])
    command = " ".join(["python -m bench.pairs", *(f"'{a}'" if " " in a else a for a in sys.argv[1:])])
    rows = []
    if not args.only_triples:
        rows = run_pairs(model, pool, seeds, lr, RANK_FRACTION, log=log, shown=shown, variants=variants, cache=cache)
        a, b = pairs_of(pool)[0]
        pair_grid(out / "pairs_grid.png", shown, f"{a.name} (sks) + {b.name} (zwx), seed {seeds[0]}",
                  render(a.references()[:2] + b.references()[:2]))
        _write(out, rows, [], command, run)  # the pairs' results stand even if the triples are cut short
    if args.triples or args.only_triples:
        triples = run_pairs(model, evaluated, seeds, lr, RANK_FRACTION, log=log, size=3, variants=triple_variants,
                            cache=cache)
        _write(out, rows, triples, command, run)


def _write(out: Path, rows: list[dict], triples: list[dict], command: str, run: WorldRun) -> None:
    minutes = run.minutes
    if not rows:  # triples alone: kept apart, and joined to the pairs run's results in the same folder
        (out / "triples.json").write_text(json.dumps({"triples": triples, "minutes": minutes}, indent=1))
        if not (out / "pairs.json").exists():
            return
        earlier = json.loads((out / "pairs.json").read_text())
        rows, minutes = earlier["rows"], earlier["minutes"]
    (out / "pairs.json").write_text(json.dumps({"rows": rows, "triples": triples, "minutes": minutes}, indent=1))
    section = report_section(rows, command, minutes, triples)
    print(section, flush=True)
    write_section(out / "report.md", section)
    print(f"wrote {out}/pairs.json, report.md, pairs_grid.png ({minutes:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
