"""Flux.1 [dev] at full size, computed on ComfyUI's own Flux class on the meta device (no weights, no memory):
where a personalized residual could go (its parameters at the paper's rank, 5% of each layer's output
width, as on SD), and the activation memory training one needs at 1024 px, counted as autograd saves the
tensors for backward, not guessed.

    ~/ComfyUI/.venv/bin/python -m bench.flux_sizes        (seconds; writes bench/results/flux_sizes.md)

The model: ComfyUI's detection (comfy.model_detection.detect_unet_config) reads Flux.1 [dev]'s block counts
and input widths from its state-dict keys; the keys are made here with dev's shapes (19 double blocks, 38
single blocks, guidance input). Training pass: batch 1, a 1024x1024 image (a 128x128 latent, 4096 image
tokens of 2x2 patches), 512 T5 tokens, bf16 weights and compute, the residual in fp32, frozen weights
(autograd saves each Linear's input for the gradient that flows back through it, not its weight's
gradient). Attention is counted as a fused kernel (flash / memory-efficient SDPA) keeps it on a GPU: q, k,
v, the output and one float32 log-sum-exp per query and head, never the N x N probabilities: an
`optimized_attention_override` in transformer_options (ComfyUI's hook for this) stands in for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from comfyui_models import bootstrap

OUT = Path(__file__).resolve().parent / "results" / "flux_sizes.md"
RANK_FRACTION = 0.05
IMAGE_PX, T5_TOKENS = 1024, 512


def dev_state_dict_keys():
    """Flux.1 [dev]'s keys that ComfyUI's detection reads, with their shapes, on the meta device."""
    import torch

    meta = {"img_in.weight": (3072, 64), "vector_in.in_layer.weight": (3072, 768),
            "guidance_in.in_layer.weight": (3072, 256)}
    meta |= {f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(19)}
    meta |= {f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(38)}
    return {k: torch.empty(shape, device="meta") for k, shape in meta.items()}


def build_flux_dev():
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops
    import torch

    config = comfy.model_detection.detect_unet_config(dev_state_dict_keys(), "")
    assert config["image_model"] == "flux", config
    config.pop("image_model")
    return comfy.ldm.flux.model.Flux(**config, dtype=torch.bfloat16, device="meta",
                                     operations=comfy.ops.disable_weight_init), config


# Where a residual could go, per block kind: the layer, and which stream(s) its positions carry.
CANDIDATES = [
    ("double_blocks.*.img_attn.proj", "image stream's attention output: proj_out's counterpart"),
    ("single_blocks.*.linear2", "attention + MLP output of both streams (masked on image tokens only)"),
    ("double_blocks.*.img_mlp.2", "image stream's MLP output"),
    ("double_blocks.*.txt_attn.proj", "text stream's attention output (no spatial mask possible)"),
]


def residual_sizes(model) -> list[dict]:
    from personalized_residuals.residual_core import rank_for
    from torch import nn

    rows = []
    for pattern, role in CANDIDATES:
        head, tail = pattern.split(".*.")
        layers = [m.get_submodule(tail) for m in model.get_submodule(head)]
        assert all(isinstance(x, nn.Linear) for x in layers)
        ranks = [rank_for(x.out_features, RANK_FRACTION) for x in layers]
        params = sum(r * (x.in_features + x.out_features) for r, x in zip(ranks, layers, strict=True))
        base = sum(x.weight.numel() for x in layers)
        rows.append({"layers": pattern, "role": role, "count": len(layers),
                     "shape": f"{layers[0].in_features} -> {layers[0].out_features}", "rank": ranks[0],
                     "params": params, "base_params": base})
    return rows


class _FusedAttentionSaves:
    """Stands in for ComfyUI's attention kernel (as optimized_attention_override): the output of the right
    shape, and for backward only what a fused kernel keeps."""

    def __init__(self, record):
        self.record = record

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        import torch

        b, h, n, d = q.shape  # Flux calls with skip_reshape=True: [batch, heads, tokens, head_dim]
        out = torch.empty(b, n, h * d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
        for t in (q, k, v, out, lse):
            self.record(t)
        # Differentiable in q, k, v without saving anything more: autograd must still reach the earlier blocks.
        return out + 0 * (q.sum() + k.sum() + v.sum())


def training_memory(model, config, residual_layers: list[str], checkpoint_blocks: bool) -> dict:
    """Bytes autograd keeps for backward in one training step with residuals on `residual_layers` (module
    paths), all blocks' activations kept, or (checkpoint_blocks) each block's input kept and the largest
    block's saved tensors recomputed during backward."""
    import torch
    from personalized_residuals.residual_core import LowRankResidual, rank_for

    model.requires_grad_(False)  # frozen: only the residual learns
    params = {id(p) for p in model.parameters()}
    per_block: dict[str, int] = {}
    current = ["outside"]
    seen: set = set()

    def record(t):
        if id(t) in params or not t.is_floating_point():
            return
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape))
        if key in seen:
            return
        seen.add(key)
        per_block[current[0]] = per_block.get(current[0], 0) + t.numel() * t.element_size()

    def pack(t):
        record(t)
        return t

    def enter(name):
        def pre_hook(module, args, kwargs):
            current[0] = name
        return pre_hook

    handles = []
    for kind in ("double_blocks", "single_blocks"):
        for i, block in enumerate(model.get_submodule(kind)):
            handles.append(block.register_forward_pre_hook(enter(f"{kind}.{i}"), with_kwargs=True))
    residuals = []
    for path in residual_layers:
        layer = model.get_submodule(path)
        res = LowRankResidual(layer.out_features, layer.in_features, rank_for(layer.out_features, RANK_FRACTION),
                              conv=False).to("meta")
        residuals.append(res)
        handles.append(layer.register_forward_hook(lambda m, a, out, res=res: out + res.delta(a[0]).to(out.dtype)))

    h = w = IMAGE_PX // 8
    x = torch.empty(1, 16, h, w, dtype=torch.bfloat16, device="meta")
    context = torch.empty(1, T5_TOKENS, 4096, dtype=torch.bfloat16, device="meta")
    y = torch.empty(1, 768, dtype=torch.bfloat16, device="meta")
    timestep = torch.empty(1, device="meta")
    guidance = torch.empty(1, device="meta")
    options = {"optimized_attention_override": _FusedAttentionSaves(record)}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, timestep, context, y=y, guidance=guidance, transformer_options=options)
    finally:
        for handle in handles:
            handle.remove()
    blocks = {k: v for k, v in per_block.items() if k != "outside"}
    total = sum(per_block.values())
    if checkpoint_blocks:  # kept: each block's input (img and txt streams), plus one block's recomputed saves
        tokens = (h // 2) * (w // 2) + T5_TOKENS
        block_inputs = len(blocks) * tokens * config["hidden_size"] * 2
        total = per_block.get("outside", 0) + block_inputs + max(blocks.values())
    return {"bytes": total, "largest_block": max(blocks.values()), "blocks": len(blocks),
            "residual_params": sum(p.numel() for r in residuals for p in r.parameters())}


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    reason = bootstrap(("--cpu",))
    if reason:
        raise SystemExit(reason)
    model, config = build_flux_dev()
    weights = sum(p.numel() for p in model.parameters())
    rows = residual_sizes(model)
    chosen = ([f"double_blocks.{i}.img_attn.proj" for i in range(config["depth"])]
              + [f"single_blocks.{i}.linear2" for i in range(config["depth_single_blocks"])])
    kept = training_memory(model, config, chosen, checkpoint_blocks=False)
    model, _ = build_flux_dev()
    recomputed = training_memory(model, config, chosen, checkpoint_blocks=True)
    lines = [
        "# Flux.1 [dev]: residual sizes and training memory (computed)",
        "",
        "Command: `~/ComfyUI/.venv/bin/python -m bench.flux_sizes` (ComfyUI's Flux class at full size on the meta "
        f"device; {weights:,} transformer parameters, {gib(weights * 2)} in bf16).",
        "",
        f"Residual at rank {RANK_FRACTION:.0%} of each layer's output width:",
        "",
        "| layers | what they carry | count | shape | rank | residual parameters | the layers' own |",
        "|---|---|---|---|---|---|---|",
        *[f"| `{r['layers']}` | {r['role']} | {r['count']} | {r['shape']} | {r['rank']} | {r['params']:,} "
          f"({gib(r['params'] * 4)} fp32) | {r['base_params']:,} |" for r in rows],
        "",
        f"Training one step at {IMAGE_PX} px, batch 1, {T5_TOKENS} T5 tokens, residuals on every `img_attn.proj` "
        f"and `linear2` ({kept['residual_params']:,} parameters), bf16 compute, attention as a fused kernel keeps it:",
        "",
        "| | activations kept for backward | + bf16 weights | + residual, its grads and Adam state (fp32) |",
        "|---|---|---|---|",
    ]
    extra = kept["residual_params"] * 4 * 4  # weights, grads, two Adam moments
    for label, m in (("every block's activations kept", kept), ("gradient checkpointing per block", recomputed)):
        lines.append(f"| {label} | {gib(m['bytes'])} | {gib(m['bytes'] + weights * 2)} | "
                     f"{gib(m['bytes'] + weights * 2 + extra)} |")
    lines += ["", f"Largest single block's saved tensors: {gib(kept['largest_block'])} ({kept['blocks']} blocks). "
              "Not counted: the T5 and CLIP encoders and the VAE (run once before training, then freed), the "
              "allocator's fragmentation, and the CUDA context (about 0.5 GiB)."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
