"""Speed and memory, measured side by side on ComfyUI's own SD1.5 model class (full size, random weights).

    ~/ComfyUI/.venv/bin/python -m bench.perf                    # CPU: 64 px images (8x8 latents)
    python -m bench.perf --device cuda --size 512 --full-run 150  # on a GPU machine (bench/gpu_check.sh)

Every measurement runs in a fresh process (so peak memory is its own) and reports the median of
--repeats steps after one warm-up step:
  a. one training step (batch 4): ours, ours without its optimisations (weights requiring grad; gradient
     checkpointing on), and ComfyUI's built-in Train LoRA node with its defaults (LoRA rank 8 on every
     layer, gradient checkpointing on, bf16) and with checkpointing off;
  b. one sampling step (CFG, same batch): the plain model, LAG, and the global residual;
  c. file sizes: our residual, a rank-8 LoRA on every layer, a full fine-tune.
Writes bench/results/perf.md (the README shows it). Needs a ComfyUI checkout (tests/comfyui_models.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_CONFIGS = {
    "ours": "ours (default: frozen weights, no checkpointing)",
    "ours_checkpointing": "ours, gradient checkpointing on",
    "ours_weights_require_grad": "ours before: frozen weights still requiring grad",
    "builtin": "ComfyUI Train LoRA, defaults (r8 all layers, checkpointing, bf16)",
    "builtin_no_checkpointing": "ComfyUI Train LoRA, checkpointing off",
}
SAMPLE_CONFIGS = {"plain": "plain model", "lag": "LAG (max_fraction 0.5)", "global": "global residual"}


# ------------------------------------------------------------------------------------------- one measurement

def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _setup(args):
    from comfyui_models import bootstrap

    reason = bootstrap(("--cpu",) if args.device == "cpu" else ())
    if reason:
        sys.exit(reason)
    import torch
    from comfyui_models import build_clip, build_sd15, build_vae

    torch.manual_seed(0)
    model = build_sd15(320, 768)  # SD1.5's own widths: 859.5M UNet parameters
    clip, vae = build_clip("sd1", width=768), build_vae()
    images = torch.rand(args.batch, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    return model, clip, vae, images


class _Clock:
    """Timestamps of successive steps -> median step time after the warm-up."""

    def __init__(self):
        self.stamps = [time.perf_counter()]

    def tick(self, *_, **__):
        self.stamps.append(time.perf_counter())

    def median(self) -> float:
        steps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:], strict=False)]  # drop the warm-up step
        return statistics.median(steps)


def measure(args) -> dict:
    model, clip, vae, images = _setup(args)
    import comfy.utils
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _peak_bytes(device)
    clock = _Clock()
    name = args.one
    if name == "full_run":  # a whole training run: total seconds from the first step to the last
        args.repeats = args.full_run - 1
    if name.startswith("ours") or name == "full_run":
        from personalized_residuals.nodes.train import TrainPersonalizedResidual
        from personalized_residuals.residual_core import hooks, train

        if name == "ours_weights_require_grad":  # what the loop would do without freezing the UNet
            real_frozen = hooks.frozen

            def leave_grads_on(unet):
                ctx = real_frozen(unet)

                class _Ctx:
                    def __enter__(self):
                        ctx.__enter__()
                        for p in unet.parameters():
                            p.requires_grad_(True)

                    def __exit__(self, *exc):
                        for p in unet.parameters():
                            p.requires_grad_(False)
                        return ctx.__exit__(*exc)

                return _Ctx()

            train.frozen = leave_grads_on
        update = comfy.utils.ProgressBar.update

        def ticking_update(self, value):
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock.tick()
            update(self, value)

        comfy.utils.ProgressBar.update = ticking_update
        steps = args.repeats + 1
        with torch.inference_mode():
            clock.stamps = [time.perf_counter()]
            TrainPersonalizedResidual.execute(
                model=[model], clip=[clip], vae=[vae], images=[images], class_word=["dog"], identifier=["sks"],
                steps=[steps], learning_rate=[1e-3], batch_size=[args.batch], rank_fraction=[0.05], seed=[0],
                resolution=[args.size], flip=[False], init=["zero"],
                gradient_checkpointing=[name == "ours_checkpointing"], sample_steps=[0])
    elif name.startswith("builtin"):
        import comfy_extras.nodes_train as nodes_train

        sampler_init = nodes_train.TrainSampler.__init__

        def timed_init(self, *a, loss_callback=None, **kw):
            def callback(loss):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                clock.tick()
                if loss_callback:
                    loss_callback(loss)

            sampler_init(self, *a, loss_callback=callback, **kw)

        nodes_train.TrainSampler.__init__ = timed_init
        with torch.inference_mode():
            latents = {"samples": vae.encode(images)}
            positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a sks dog"))
            node = nodes_train.TrainLoraNode()
            clock.stamps = [time.perf_counter()]
            node.train(model, latents, positive, batch_size=args.batch, grad_accumulation_steps=1,
                       steps=args.repeats + 1, learning_rate=5e-4, rank=8, optimizer="AdamW", loss_function="MSE",
                       seed=0, training_dtype="bf16", lora_dtype="bf16", algorithm="LoRA",
                       gradient_checkpointing=name == "builtin", existing_lora="[None]")
    else:  # sampling
        import comfy.sample
        import comfy.samplers
        from personalized_residuals.nodes.lag import LagSampler
        from personalized_residuals.residual_core import ResidualSet, find_targets

        with torch.inference_mode():
            residual = ResidualSet.for_targets(find_targets(model.model.diffusion_model), 0.05, "random", 0)
            residual.meta.class_word, residual.meta.identifier = "dog", "sks"
            prompt = "a photo of a sks dog on the beach"
            if name == "plain":
                m, positive = model, clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
            else:
                m, positive = LagSampler.execute(model, residual, clip, prompt, 1.0, "LAG" if name == "lag" else "global",
                                                 "max_fraction", 0.5, 0.0, 1.0).result
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
            latent = torch.zeros(args.batch, 4, args.size // 8, args.size // 8)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))

            def callback(step, x0, x, total):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                clock.tick()

            clock.stamps = [time.perf_counter()]
            comfy.sample.sample(m, noise, args.repeats + 1, 7.0, "euler", "normal", positive, negative, latent,
                                callback=callback, disable_pbar=True, seed=0)
    total = clock.stamps[-1] - clock.stamps[0]
    return {"config": name, "seconds": clock.median(), "steps": len(clock.stamps) - 2, "total_seconds": total,
            "peak_bytes": _peak_bytes(device), "setup_bytes": base_rss}


# ------------------------------------------------------------------------------------------- the LAG map

def lag_map_timing(device: str, repeats: int = 20) -> dict[str, float]:
    """The class-word map of one SD1.5 block at 64x64 latents (4096 positions, 320 channels, 8 heads, 77
    prompt tokens, batch 2): residual_core.token_attention against the first version (a logsumexp over the
    77 columns, then only the picked columns exponentiated), which measured slower than the fused softmax
    kernel it now uses. Median seconds."""
    import torch
    from personalized_residuals.residual_core import token_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4096, 320, generator=g).to(device), torch.randn(2, 77, 320, generator=g).to(device)
    positions = torch.tensor([5, 6], device=device)

    def first_version():
        logits = torch.einsum("bnhd,bthd->bhnt", q.view(2, 4096, 8, 40), k.view(2, 77, 8, 40)).float() * 40**-0.5
        return (logits.index_select(-1, positions) - logits.logsumexp(-1, keepdim=True)).exp().sum(-1).mean(1)

    fns = {"ours": lambda: token_attention(q, k, 8, positions), "first version": first_version}
    times = {name: [] for name in fns}
    # Both warmed up first, then timed in turns: the first calls in a process pay for the allocator and
    # the thread pool (a single warm-up call once made whichever ran first look 1.3x slower).
    for rep in range(3 + repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if rep >= 3:
                times[name].append(time.perf_counter() - started)
    out = {name: statistics.median(t) for name, t in times.items()}
    assert torch.allclose(token_attention(q, k, 8, positions), first_version(), atol=1e-5)
    return out


# ------------------------------------------------------------------------------------------- sizes

def file_sizes(args) -> dict[str, int]:
    """Bytes on disk: our residual file (written for real), and a rank-8 LoRA on every layer (as the built-in
    trainer makes it, bf16) and a full fine-tune (fp16 UNet), counted from the model's shapes."""
    import tempfile

    import torch
    from comfyui_models import bootstrap

    bootstrap(("--cpu",))
    import comfy.supported_models
    from comfyui_models import unet_config
    from personalized_residuals.residual_core import ResidualSet, fileformat, find_targets

    with torch.device("meta"):
        unet = comfy.supported_models.SD15(unet_config(model_channels=320, context_dim=768)).get_model({}).diffusion_model
    residual = ResidualSet.for_targets(find_targets(unet), 0.05)
    with tempfile.TemporaryDirectory() as d:
        fileformat.save(residual, os.path.join(d, "r.safetensors"))
        ours = os.path.getsize(os.path.join(d, "r.safetensors"))
    lora = 0
    for p in unet.parameters():
        if p.ndim >= 2:
            lora += 8 * (p.shape[0] + p[0].numel()) * 2 + 2  # up, down (bf16) and alpha
    full = sum(p.numel() for p in unet.parameters()) * 2
    return {"ours": ours, "lora_r8_all_layers": lora, "full_fine_tune_fp16": full,
            "ours_parameters": residual.num_parameters()}


# ------------------------------------------------------------------------------------------- the report

def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads (torch {torch.__version__})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (latents are size/8)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated configs (default: all)")
    ap.add_argument("--full-run", type=int, default=0, help="also time a whole training run of this many steps")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # a single measurement, in this process
    ap.add_argument("--out", default=str(RESULTS / "perf.md"))
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    wanted = [c for c in [*TRAIN_CONFIGS, *SAMPLE_CONFIGS] if not args.only or c in args.only.split(",")]
    wanted += ["full_run"] if args.full_run else []
    results = {}
    for name in wanted:
        cmd = [sys.executable, "-m", "bench.perf", "--one", name, "--device", args.device, "--size", str(args.size),
               "--batch", str(args.batch), "--repeats", str(args.repeats), "--full-run", str(args.full_run)]
        started = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{out.stderr[-3000:]}", flush=True)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        print(f"{name}: {results[name]['seconds']:.3f} s/step, peak {results[name]['peak_bytes'] / 2**30:.2f} GiB "
              f"({time.time() - started:.0f} s)", flush=True)
    sizes = file_sizes(args)
    lag_map = lag_map_timing(args.device)
    report = render_report(args, results, sizes, lag_map)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report + "\n")


def render_report(args, results: dict, sizes: dict, lag_map: dict[str, float]) -> str:
    def ratio(a, b):
        return f"{results[a]['seconds'] / results[b]['seconds']:.2f}x" if a in results and b in results else "-"

    gib = 2**30
    lines = [
        "# Speed and memory",
        "",
        f"Machine: {_machine(args.device)}. Model: ComfyUI's SD1.5 class, full size, random weights. Images "
        f"{args.size} px ({args.size // 8}x{args.size // 8} latents), batch {args.batch} for training and for sampling "
        f"(with CFG: {2 * args.batch} rows per UNet call). Median of {args.repeats} steps after a warm-up, each "
        "configuration in its own process. "
        f"Command: `python -m bench.perf --device {args.device} --size {args.size}`.",
        "",
        "| training step | s/step | vs built-in default | peak memory (process) |",
        "|---|---|---|---|",
    ]
    for key, label in TRAIN_CONFIGS.items():
        if key in results:
            r = results[key]
            lines.append(f"| {label} | {r['seconds']:.3f} | {ratio(key, 'builtin')} | {r['peak_bytes'] / gib:.2f} GiB |")
    lines += ["", "| sampling step | s/step | vs plain |", "|---|---|---|"]
    for key, label in SAMPLE_CONFIGS.items():
        if key in results:
            lines.append(f"| {label} | {results[key]['seconds']:.3f} | {ratio(key, 'plain')} |")
    lines += ["", f"LAG's class-word map for one SD1.5 block at 64x64 latents (batch 2): {lag_map['ours'] * 1e3:.1f} ms "
              f"with the fused softmax, {lag_map['first version'] * 1e3:.1f} ms with the first version (logsumexp, then "
              f"only the picked columns exponentiated): {lag_map['first version'] / lag_map['ours']:.2f}x, same result."]
    if "ours" in results and "plain" in results:
        lines += ["", f"Training peak / sampling peak: {results['ours']['peak_bytes'] / results['plain']['peak_bytes']:.2f}x "
                  f"at batch {args.batch} (target: at most 1.3x)."]
    if "full_run" in results:
        r = results["full_run"]
        lines += ["", f"Whole training run: {args.full_run} steps at batch {args.batch}, {args.size} px: "
                  f"{r['total_seconds']:.1f} s from the start of the Train node (encoding the photos, loading the model) to "
                  f"its last step; median step {r['seconds']:.3f} s; peak {r['peak_bytes'] / gib:.2f} GiB."]
    lines += [
        "",
        "| file | size | vs ours |",
        "|---|---|---|",
        f"| our residual ({sizes['ours_parameters']:,} parameters, fp32) | {sizes['ours'] / 2**20:.2f} MiB | 1x |",
        f"| LoRA rank 8 on every layer (bf16, as the built-in trainer saves it) | {sizes['lora_r8_all_layers'] / 2**20:.2f} MiB "
        f"| {sizes['lora_r8_all_layers'] / sizes['ours']:.1f}x |",
        f"| full fine-tune (fp16 UNet) | {sizes['full_fine_tune_fp16'] / 2**20:.0f} MiB | "
        f"{sizes['full_fine_tune_fp16'] / sizes['ours']:.0f}x |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
