"""Train a residual and sample with LAG in a ComfyUI started with the given command-line flags.

ComfyUI parses its flags once, at import, so tests/tier2/test_precisions.py runs this once per flag set, with
the ComfyUI venv's python:

    python tests/precision_check.py OUT_DIR [--emulate cpu,t4] [--no-loss-scaling] -- --cpu --fp16-unet

The model is a small SD1.5 (ComfyUI's own SD15 classes, random weights) loaded as ComfyUI's checkpoint loader
loads one (comfy.sd.load_state_dict_guess_config): the weight dtype from comfy.model_management.unet_dtype,
the compute dtype from unet_manual_cast. ComfyUI's model detection only knows full-size UNets, so those two
calls are made here on the small one. --emulate picks the device ComfyUI answers for: `cpu`, this machine
(every flag computes in float32 here, with the weights stored in the flag's dtype); `t4`, a GPU without
bf16 (should_use_fp16 True, should_use_bf16 False, as ComfyUI answers on a T4: fp16 compute, which the CPU
can run); `ampere`, a GPU with both (the weights ComfyUI picks, and the node's bf16 autocast, which the CPU
runs too, except on fp16 weights: torch's CPU group_norm refuses bf16 input with fp16 parameters).

For each mode it trains with the real node and saves the residual to OUT_DIR/<mode>.safetensors, trains
again in float32 on the same weights (rounded to the run's weight dtype) into OUT_DIR/<mode>-fp32.safetensors
(unless the run is that already), samples with the LAG Sampler and the stock KSampler, and prints one JSON
line. --no-loss-scaling trains as before loss scaling existed (for measuring what it changes).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from pack_alias import import_pack  # this script's folder, tests/, is on sys.path

# Training settings shared by every run, so their residuals can be compared.
SETTINGS = {"steps": 6, "learning_rate": 1e-3, "batch_size": 2, "resolution": 128, "rank_fraction": 0.25, "seed": 0}


@contextmanager
def answers_as_on(device: str):
    """ComfyUI's dtype questions answered as on `device` ('cpu': this machine, unchanged; 't4': a GPU with
    fp16 but no bf16; 'ampere': a GPU with both)."""
    import comfy.model_management as mm

    if device == "cpu":
        yield
        return
    saved = mm.should_use_fp16, mm.should_use_bf16
    mm.should_use_fp16 = lambda *args, **kwargs: True
    mm.should_use_bf16 = lambda *args, **kwargs: device == "ampere"
    try:
        yield
    finally:
        mm.should_use_fp16, mm.should_use_bf16 = saved


def load_like_comfyui(state_dict: dict, device: str | None):
    """The small SD1.5 built from `state_dict` (float32, as in a checkpoint file) with the dtypes ComfyUI's
    checkpoint loader would pick (comfy.sd.load_state_dict_guess_config, l.1188-1219) on `device`; None:
    float32 weights and compute whatever the flags say (the reference)."""
    import comfy.model_management as mm
    import comfy.supported_models
    import comfy.utils
    import torch
    from comfyui_models import patcher, unet_config

    config = comfy.supported_models.SD15(unet_config())
    weight_dtype, manual_cast = torch.float32, None
    if device is not None:
        with answers_as_on(device):
            weight_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(state_dict),
                                         supported_dtypes=list(config.supported_inference_dtypes),
                                         weight_dtype=comfy.utils.weight_dtype(state_dict))
            manual_cast = mm.unet_manual_cast(weight_dtype, mm.get_torch_device(), config.supported_inference_dtypes)
    config.set_inference_dtype(weight_dtype, manual_cast)
    with torch.inference_mode():
        model = config.get_model(state_dict, "")
        model.load_model_weights(state_dict, "")
    return patcher(model)


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--emulate", default="cpu", help="comma-separated: cpu, t4, ampere")
    parser.add_argument("--no-loss-scaling", action="store_true", help="train as before loss scaling existed")
    ours, flags = sys.argv[1:], []
    if "--" in ours:
        ours, flags = ours[: ours.index("--")], ours[ours.index("--") + 1:]
    args = parser.parse_args(ours)

    import_pack()
    from comfyui_models import bootstrap, build_clip, build_sd15, build_vae

    why = bootstrap(device_args=tuple(flags))
    if why:
        raise SystemExit(why)
    import comfy.ldm.modules.attention as comfy_attention
    import torch
    from comfy_env import ksample, run, train
    from personalized_residuals.nodes import train as train_node
    from personalized_residuals.nodes.lag import LagSampler
    from personalized_residuals.nodes.precision import compute_dtype
    from personalized_residuals.residual_core import fileformat

    import nodes as comfy_nodes

    scalers, choose = [], train_node.loss_scaler

    def record_scaler(*a):  # the node's choice, kept for the report (or none, to show what it is for)
        scalers.append(None if args.no_loss_scaling else choose(*a))
        return scalers[-1]

    train_node.loss_scaler = record_scaler
    autocast = train_node.autocast_dtype
    with torch.inference_mode():  # the same random weights in every process, float32 as in a checkpoint file
        state_dict = {k.removeprefix("diffusion_model."): v for k, v in build_sd15().model.state_dict().items()
                      if k.startswith("diffusion_model.")}
    clip, vae = build_clip("sd1"), build_vae()
    images = [torch.rand(2, 128, 128, 3, generator=torch.Generator().manual_seed(0))]
    args.out.mkdir(parents=True, exist_ok=True)
    for device in args.emulate.split(","):
        model = load_like_comfyui(dict(state_dict), device)  # a copy: the loader pops what it loads
        base = model.model
        dtypes = sorted({_name(p.dtype) for p in base.diffusion_model.parameters()})
        scalers.clear()
        # On a GPU with bf16 the node trains under bf16 autocast; the CPU runs it too (its answer here is None).
        train_node.autocast_dtype = (lambda _device: torch.bfloat16) if device == "ampere" else autocast
        residual = train(model, clip, vae, images, **SETTINGS)[0]
        train_node.autocast_dtype = autocast
        fileformat.save(residual, str(args.out / f"{device}.safetensors"))
        # The reference: trained in float32 on the same weights (rounded to this run's weight dtype), so that the
        # two differ only by the precision training ran in (a float32 run is its own reference).
        weight_dtype = base.diffusion_model.input_blocks[1][1].proj_out.weight.dtype
        if (weight_dtype, compute_dtype(base), device) != (torch.float32, torch.float32, "cpu"):
            same = load_like_comfyui({k: v.to(weight_dtype).float() for k, v in state_dict.items()}, None)
            fileformat.save(train(same, clip, vae, images, **SETTINGS)[0], str(args.out / f"{device}-fp32.safetensors"))
        positive = run(LagSampler, model, residual, clip, "a photo of a sks dog on the beach", strength=1.0,
                       mode="LAG", mask_rule="max_fraction", mask_value=0.5, start_percent=0.0, end_percent=1.0)
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        lag = ksample(positive[0], positive[1], negative, steps=3, size=8)
        plain = ksample(model, positive[1], negative, steps=3, size=8)
        scaler = scalers[0] if scalers else None
        print(json.dumps({
            "flags": flags, "emulate": device, "weight_dtypes": dtypes,
            "compute_dtype": _name(compute_dtype(base)), "autocast": device == "ampere",
            "proj_out_dtype": _name(base.diffusion_model.input_blocks[1][1].proj_out.weight.dtype),
            "attention": getattr(comfy_attention.optimized_attention, "__wrapped__",
                                 comfy_attention.optimized_attention).__name__,
            "loss_scaling": scaler is not None, "skipped_steps": scaler.skipped if scaler else 0,
            "residual_finite": all(bool(torch.isfinite(p).all()) for p in residual.parameters()),
            "sample_finite": bool(torch.isfinite(lag).all()),
            "lag_changes_sample": float((lag - plain).abs().max()),
        }), flush=True)


if __name__ == "__main__":
    main()
