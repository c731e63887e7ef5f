"""Pretrain the evaluation world's base model from a seed, then report its own prompt fidelity.

    python -m bench.pretrain                  # CPU or CUDA, whichever is here; writes bench/weights/
    python -m bench.pretrain --report-only    # score the shipped weights
    python -m bench.pretrain --patterns       # the second base model: also knows pattern words
    python -m bench.pretrain --patterns --resume   # go on from its last checkpoint

Fresh scenes every step (drawn from a large seeded pool), v-prediction loss at uniform timesteps, AdamW
with warm-up and cosine decay, an EMA of the weights (what is saved), and oracle checks as it trains.
With --patterns, half the objects carry a random pattern their caption names ("a red and yellow checkered
square"), so a concept of the evaluation is a specific combination the model can already draw, as a pet
is for SD. Every --eval-every steps the run writes the EMA weights and a checkpoint to resume from
(<out>.resume.safetensors and .json: weights, EMA, optimizer moments, step, schedule, random state).
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
from safetensors.torch import load_file, save_file

from .world import oracle
from .world.concepts import Concept, random_pattern
from .world.model import WEIGHTS, WorldModel, to_latent
from .world.scenes import COLOR_NAMES, SHAPES, Obj, describe, random_scene, render_params, scene_params
from .world.text import VOCAB, tokenize

PATTERN_WEIGHTS = WEIGHTS.with_name("world_patterns.safetensors")
PATTERN_RATE = 0.5


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
def fidelity(model: WorldModel, seeds=(0, 1), two: int = 64, batch: int = 256, single: int | None = None
             ) -> dict[str, float]:
    """Oracle scores of the model's own samples: single-object prompts (shape, colour, background each
    right, and all three; `single` of them, spread over the list, or all 168), two-object prompts
    (everything right) and, for a model that knows the pattern words, patterned objects (identity)."""
    prompts = single_object_prompts()
    prompts = prompts[:: max(1, len(prompts) // single)] if single else prompts
    singles = [(p, s) for p in prompts for s in seeds]
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
    out = {f"single_{k}": v / len(singles) for k, v in counts.items()} | {"two_all": two_ok / len(pairs)}
    if model.text.token_embedding.num_embeddings == len(VOCAB):  # a model that knows the pattern words
        out["pattern_identity"] = pattern_identity(model, n=two)
    return out


@torch.no_grad()
def pattern_identity(model: WorldModel, n: int = 64, seed: int = 0) -> float:
    """Mean oracle identity of 'a <pattern words> <shape> on a <background> background' to that pattern."""
    rng = random.Random(seed)
    wanted = []
    for _ in range(n):
        bg, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
        obj = Obj(shape, bg, 16, 16, 9, pattern=random_pattern(rng, bg, shape), say_pattern=True)
        wanted.append((Concept("asked", shape, obj.pattern), describe([obj], bg)))
    readings = oracle.read_images(model.sample([caption for _, caption in wanted], list(range(n))))
    return sum(oracle.identity(r, c)[0] for r, (c, _) in zip(readings, wanted, strict=True)) / n


def save_checkpoint(path: Path, model, ema, optimizer, generator, state: dict) -> None:
    """What a run needs to go on where it stopped, as safetensors (tensors) and JSON (the rest)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | {f"ema.{k}": v for k, v in ema.state_dict().items()}
    for i, moments in optimizer.state_dict()["state"].items():
        tensors |= {f"adam.{i}.{k}": torch.as_tensor(v) for k, v in moments.items()}
    tensors["generator"] = generator.get_state()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
    state = state | {"param_groups": optimizer.state_dict()["param_groups"]}  # the learning rate the schedule set
    path.with_suffix(".json").write_text(json.dumps(state, indent=1) + "\n")


def load_checkpoint(path: Path, model, ema, optimizer, generator, device) -> dict:
    tensors = load_file(str(path.with_suffix(".safetensors")), device=str(device))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state = json.loads(path.with_suffix(".json").read_text())
    opt = optimizer.state_dict() | {"param_groups": state["param_groups"]}
    for key, v in tensors.items():
        if key.startswith("adam."):
            _, i, name = key.split(".")
            opt["state"].setdefault(int(i), {})[name] = v.cpu() if name == "step" else v
    optimizer.load_state_dict(opt)
    generator.set_state(tensors["generator"].cpu())
    return state


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no limit)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=200_000, help="distinct training scenes drawn up front")
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--patterns", action="store_true", help=f"objects with patterns their captions name (default out: "
                    f"{PATTERN_WEIGHTS.name})")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true", help="go on from <out>.resume.safetensors")
    ap.add_argument("--stop-at", type=int, default=0, help="leave the run at this step, a checkpoint written, to resume")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="oracle checks on a few prompts only (a CPU smoke test)")
    args = ap.parse_args(argv)
    checks = dict(single=8, two=4) if args.smoke else {}
    args.out = args.out or str(PATTERN_WEIGHTS if args.patterns else WEIGHTS)
    device = torch.device(args.device)
    resume_path = Path(str(args.out).replace(".safetensors", ".resume.safetensors"))

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
    scenes = [random_scene(rng, pattern_rate=PATTERN_RATE if args.patterns else 0.0) for _ in range(args.pool)]
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
    log, started, first, spent = [], time.time(), 1, 0.0
    if args.resume:
        state = load_checkpoint(resume_path, model, ema, optimizer, g, device)
        first, spent, log = state["step"] + 1, state["seconds"], state["log"]
        progress[0] = state["progress"]
        schedule.load_state_dict(state["schedule"])
        print(f"resumed at step {state['step']} ({spent:.0f} s trained)", flush=True)
    started -= spent
    step = first - 1
    for step in range(first, args.steps + 1):
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
        pause = step == args.stop_at and not done
        if step % 200 == 0 or done:
            print(f"step {step} loss {loss.item():.4f} {elapsed:.0f} s", flush=True)
        if step % args.eval_every == 0 or done or pause:
            scores = fidelity(ema.eval(), seeds=(0,), **({"two": 32} | checks))
            log.append({"step": step, "seconds": round(elapsed), **{k: round(v, 3) for k, v in scores.items()}})
            print(json.dumps(log[-1]), flush=True)
            ema.save(args.out)  # a usable model even if the run is cut short
            save_checkpoint(resume_path, model, ema, optimizer, g, {
                "step": step, "seconds": elapsed, "progress": progress[0], "schedule": schedule.state_dict(),
                "log": log, "args": {k: v for k, v in vars(args).items() if k != "resume"}})
        if pause:
            print(f"stopped at step {step}: go on with --resume", flush=True)
            return
        if done:
            break

    ema.save(args.out)
    final = fidelity(ema.eval(), **checks)
    meta = {"steps": step, "batch": args.batch, "lr": args.lr, "seed": args.seed, "pool": args.pool,
            "patterns": args.patterns,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "train_seconds": round(time.time() - started), "fidelity": {k: round(v, 3) for k, v in final.items()},
            "log": log}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta["fidelity"], indent=1))


if __name__ == "__main__":
    main()


