"""Pretrain the evaluation world's base model from a seed, then report its own prompt fidelity.

    python -m bench.pretrain                  # CPU or CUDA, whichever is here; writes bench/weights/
    python -m bench.pretrain --report-only    # score the shipped weights

Fresh scenes every step (drawn from a large seeded pool), v-prediction loss at uniform timesteps, AdamW
with warm-up and cosine decay, an EMA of the weights (what is saved), and oracle checks as it trains.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .world import oracle
from .world.model import WEIGHTS, WorldModel, to_latent
from .world.scenes import COLOR_NAMES, SHAPES, random_scene, render_params, scene_params
from .world.text import tokenize


def single_object_prompts() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour != background: 3 x 8 x 7 = 168 prompts."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOR_NAMES, COLOR_NAMES) if c != b]


def two_object_prompts(n: int, seed: int = 0) -> list[tuple[tuple[str, str], tuple[str, str], str]]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        bg = rng.choice(COLOR_NAMES)
        a = (rng.choice(SHAPES), rng.choice([c for c in COLOR_NAMES if c != bg]))
        b = (rng.choice([s for s in SHAPES if s != a[0]]), rng.choice([c for c in COLOR_NAMES if c != bg]))
        out.append((a, b, bg))
    return out


@torch.no_grad()
def fidelity(model: WorldModel, seeds=(0, 1), two: int = 64, batch: int = 256) -> dict[str, float]:
    """Oracle scores of the model's own samples: single-object prompts (shape, colour, background each
    right, and all three) and two-object prompts (everything right)."""
    singles = [(p, s) for p in single_object_prompts() for s in seeds]
    captions = [f"a {c} {s} on a {b} background" for (s, c, b), _ in singles]
    images = torch.cat([model.sample(captions[i:i + batch], [s for _, s in singles[i:i + batch]])
                        for i in range(0, len(captions), batch)])
    counts = dict(shape=0, color=0, background=0, all=0)
    for ((shape, color, bg), _), reading in zip(singles, oracle.read_images(images), strict=True):
        thing = max(reading.things, key=lambda t: t.area) if reading.things else None
        ok = dict(shape=thing is not None and thing.shape == shape, color=thing is not None and thing.color == color,
                  background=reading.background == bg)
        ok["all"] = all(ok.values()) and len(reading.things) == 1
        for k, v in ok.items():
            counts[k] += v
    pairs = two_object_prompts(two)
    captions = [f"a {a[1]} {a[0]} and a {b[1]} {b[0]} on a {bg} background" for a, b, bg in pairs]
    readings = oracle.read_images(model.sample(captions, list(range(len(pairs)))))
    two_ok = sum(oracle.prompt_fidelity(r, bg, [a, b]) for r, (a, b, bg) in zip(readings, pairs, strict=True))
    return {f"single_{k}": v / len(singles) for k, v in counts.items()} | {"two_all": two_ok / len(pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no limit)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=200_000, help="distinct training scenes drawn up front")
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)

    meta_path = Path(str(args.out).replace(".safetensors", ".json"))
    if args.report_only:  # re-score the saved model (e.g. after an oracle change) and record it
        scores = {k: round(v, 3) for k, v in fidelity(WorldModel.load(args.out, device)).items()}
        print(json.dumps(scores, indent=1))
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            meta_path.write_text(json.dumps({**meta, "fidelity": scores}, indent=1) + "\n")
        return

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()
    scenes = [random_scene(rng) for _ in range(args.pool)]
    background, objects = (t.to(device) for t in scene_params(scenes))
    ids = torch.tensor([tokenize(s.caption)[0] for s in scenes], device=device)
    print(f"{args.pool} scenes drawn in {time.time() - started:.0f} s; training on {device}", flush=True)

    model = WorldModel().to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup, progress = 500, [0.0]  # progress: the larger of the step and time fractions, for a cosine decay
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress[0]))))
    ab = model.alphas_cumprod
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(args.seed)
    log, started, step = [], time.time(), 0
    for step in range(1, args.steps + 1):
        pick = torch.randint(0, args.pool, (args.batch,), device=device, generator=g)
        x0 = to_latent(render_params(background[pick], objects[pick]))
        t = torch.randint(0, len(ab), (args.batch,), device=device, generator=g)
        eps = torch.randn(x0.shape, device=device, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        with torch.autocast(**autocast):
            v = model.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, model.text(ids[pick]))
        loss = F.mse_loss(v.float(), a.sqrt() * eps - (1 - a).sqrt() * x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        elapsed = time.time() - started
        progress[0] = min(1.0, max(step / args.steps, elapsed / (args.minutes * 60) if args.minutes else 0.0))
        done = step == args.steps or progress[0] >= 1.0
        if step % 200 == 0 or done:
            print(f"step {step} loss {loss.item():.4f} {elapsed:.0f} s", flush=True)
        if step % args.eval_every == 0 or done:
            scores = fidelity(ema.eval(), seeds=(0,), two=32)
            log.append({"step": step, "seconds": round(elapsed), **{k: round(v, 3) for k, v in scores.items()}})
            print(json.dumps(log[-1]), flush=True)
            ema.save(args.out)  # a usable model even if the run is cut short
        if done:
            break

    ema.save(args.out)
    final = fidelity(ema.eval())
    meta = {"steps": step, "batch": args.batch, "lr": args.lr, "seed": args.seed, "pool": args.pool,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "train_seconds": round(time.time() - started), "fidelity": {k: round(v, 3) for k, v in final.items()},
            "log": log}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta["fidelity"], indent=1))


if __name__ == "__main__":
    main()


