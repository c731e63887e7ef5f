"""The ComfyUI internals the pack relies on, in one place: reading MODEL and CLIP objects for the core (the
UNet, its schedule, its tokenizer) and the shapes of ComfyUI's sampling calls that LAG reads. Each
assumption is pinned by tests/tier2/test_comfy_internals.py, which names it when a ComfyUI update breaks it.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import comfy.model_base
import comfy.samplers
import torch
from comfy.model_base import ModelType
from comfy.weight_adapter import LoRAAdapter

from ..residual_core import CHROMA, FLUX, SD_UNET, Family, ResidualError, SchedulePosition, Target, Tokenize, weights_hash

_PREDICTIONS = {ModelType.EPS: "eps", ModelType.V_PREDICTION: "v"}


def unet_of(model) -> torch.nn.Module:
    return model.get_model_object("diffusion_model")


def family_of(model) -> Family:
    """The core's description of the model's family: SD1.x, SD2.x and SDXL share one (UNets with SpatialTransformers;
    the targets say which of them it is), Flux.1 models (comfy.model_base.Flux: dev, schnell, their fine-tunes)
    another. Any other model (SD3, video DiTs: their BaseModel subclass and prediction type say so) is refused by
    name before anything looks for its layers."""
    base = model.model
    if isinstance(base, comfy.model_base.Flux) and not isinstance(base, comfy.model_base.ChromaRadiance):
        return CHROMA if isinstance(base, comfy.model_base.Chroma) else FLUX  # Chroma subclasses Flux
    if getattr(base, "model_type", None) in _PREDICTIONS:
        return SD_UNET
    kind = getattr(getattr(base, "model_type", None), "name", "unknown")
    raise ResidualError(
        f"This model is {type(base).__name__} ({kind} prediction): the pack supports {SD_UNET.name}, {FLUX.name} or "
        f"{CHROMA.name} checkpoints. Load one of those with a stock loader."
    )


def targets_of(model) -> list[Target]:
    return family_of(model).targets(unet_of(model))


def prediction_of(base_model) -> str:
    """'eps' or 'v' for an SD UNet, 'flow' for Flux (comfy's FLUX model type: rectified flow, the model's raw output
    the velocity eps - x0, its sigmas model_sampling.sigmas); other model types are refused."""
    if isinstance(base_model, comfy.model_base.Flux):
        return "flow"
    kind = getattr(base_model, "model_type", None)
    if kind not in _PREDICTIONS:
        raise ResidualError(
            f"This model predicts {getattr(kind, 'name', kind)}; personalized residuals support SD1.x, SD2.x and SDXL "
            "checkpoints (epsilon or v prediction) and Flux.1."
        )
    return _PREDICTIONS[kind]


def base_hash(model, targets: list[Target]) -> str:
    """Fingerprint of the checkpoint's own proj_out weights, even while another clone's LoRA is merged in:
    ModelPatcher.backup holds, per patched weight, a record whose .weight is the original (clones share it)."""
    weights = []
    for t in targets:
        key = f"diffusion_model.{t.name}.weight"
        backup = model.backup.get(key)
        weights.append(backup.weight if backup is not None else model.get_model_object(key))
    return weights_hash(weights)


# ---------------------------------------------------------------- LoRA files (LAG LoRA)

# comfy.weight_adapter.LoRAAdapter.weights holds these, in this order (comfy/weight_adapter/lora.py).
LORA_WEIGHTS = ("up", "down", "alpha", "mid", "dora_scale", "reshape")


@dataclass(frozen=True)
class LoraWeights:
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None
    mid: torch.Tensor | None  # LoCon's middle kernel
    dora_scale: torch.Tensor | None
    reshape: list | None


def lora_weights(patch) -> LoraWeights | None:
    """A parsed LoRA layer's factors by name, or None for another adapter type (LoHa, LoKr, a diff...)."""
    if not isinstance(patch, LoRAAdapter):
        return None
    return LoraWeights(**dict(zip(LORA_WEIGHTS, patch.weights[:len(LORA_WEIGHTS)], strict=True)))


def context_key(tokens: dict) -> str:
    """Which of clip.tokenize()'s token lists (by encoder) the model's cross-attention context encodes: Flux's
    T5-XXL ("t5xxl"; its CLIP-L, "l", only gives the pooled vector), else CLIP-L ("l": SD1.x; SDXL's "l" and
    "g" share positions), else the only one (SD2.x's "h"). SD3 joins CLIP-L/G's tokens and T5's in one context:
    "l" there, SD3 not being supported."""
    if "t5xxl" in tokens and "g" not in tokens:
        return "t5xxl"
    return "l" if "l" in tokens else next(iter(tokens))


# Each CLIP's last few encodings, {what the conditioning depends on: the conditioning}; they go with the CLIP.
_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ENCODINGS_KEPT = 4  # a chain's prompt, the negative, a sample grid's prompts


def encode_prompt(clip, prompt: str) -> list:
    """clip's conditioning of `prompt`, made once: a chain of LAG nodes hands one CLIP down and each node encodes the
    chain's prompt, the Train node's sample grid renders its training prompt: the text encoders run once for them,
    not once a node or a column (Flux's T5-XXL is 4.7B parameters, often offloaded to the CPU). The conditioning
    is shared as ComfyUI shares any output: read, never changed in place. What else it depends on is in the key:
    the CLIP's patches (a LoRA's text-encoder layers), its tokenizer options (T5TokenizerOptions) and its last
    layer (CLIPSetLastLayer)."""
    patcher = getattr(clip, "patcher", None)
    key = (prompt, getattr(patcher, "patches_uuid", None), repr(sorted(getattr(clip, "tokenizer_options", {}).items())),
           getattr(clip, "layer_idx", None))
    kept = _ENCODED.setdefault(clip, {})
    if key not in kept:
        kept[key] = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        while len(kept) > ENCODINGS_KEPT:
            del kept[next(iter(kept))]  # the oldest
    return kept[key]


def check_companions(model, family: Family, clip=None, vae=None) -> None:
    """A CLIP or VAE of another model family than `model`'s (Flux's or Chroma's T5 text encoder or 16-channel VAE
    with an SD UNet, or the reverse) is refused, naming both sides, before either runs: the mismatch would otherwise surface
    as a shape error deep inside the model."""
    label = family.name
    if clip is not None and hasattr(clip, "tokenize"):
        t5 = context_key(clip.tokenize("")) == "t5xxl"
        if t5 != (family in (FLUX, CHROMA)):
            kind = "a T5-XXL text encoder (Flux's, Chroma's)" if t5 else "an SD text encoder (no T5-XXL)"
            fix = {FLUX: "a DualCLIPLoader of type flux (t5xxl and clip_l)",
                   CHROMA: "a CLIPLoader of type chroma (t5xxl)"}.get(family, "the checkpoint's own CLIP output")
            raise ResidualError(f"clip is {kind} but the model is {label}: connect {fix}.")
    channels = getattr(getattr(model.model, "latent_format", None), "latent_channels", None)
    got = getattr(vae, "latent_channels", None)
    if vae is not None and None not in (channels, got) and got != channels:
        raise ResidualError(f"vae makes {got}-channel latents but the model ({label}) takes {channels}-channel ones: "
                            "connect the model's own VAE (Flux.1: ae.safetensors).")


def tokenizer_of(clip) -> Tokenize:
    """The tokenizer of the CLIP's context encoder (context_key) as chunks of token ids, with `pieces(ids)`, the
    vocabulary's strings, for the token search's messages."""

    def tokenize(text: str) -> list[list[int]]:
        tokens = clip.tokenize(text)
        return [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in tokens[context_key(tokens)]]

    @functools.cache
    def vocabulary() -> dict[int, str]:  # looked up once: the token search asks piece by piece
        key = context_key(clip.tokenize(""))  # the encoder's SDTokenizer: FluxTokenizer.t5xxl, SD1Tokenizer.clip_l
        tokenizer = getattr(clip, "tokenizer", None)  # a CLIP stand-in may have none: ids then
        side = getattr(tokenizer, key, None) or getattr(tokenizer, f"clip_{key}", None)
        return getattr(side, "inv_vocab", {})

    def pieces(ids: list[int]) -> list[str]:
        return [vocabulary().get(i, str(i)) for i in ids]

    tokenize.pieces = pieces
    return tokenize


# ---------------------------------------------------------------- sampling calls (LAG)

# UNetModel.forward, Flux.forward and Chroma.forward hand their arguments to DIFFUSION_MODEL wrappers by position,
# in these orders (comfy/ldm/modules/diffusionmodules/openaimodel.py, comfy/ldm/flux/model.py, ldm/chroma/model.py).
CALL_ARGS = {
    SD_UNET.name: ("x", "timesteps", "context", "y", "control", "transformer_options"),
    FLUX.name: ("x", "timestep", "context", "y", "guidance", "ref_latents", "control", "transformer_options"),
    CHROMA.name: ("x", "timestep", "context", "guidance", "control", "transformer_options"),  # comfy/ldm/chroma/model.py
}
UNET_CALL_ARGS = CALL_ARGS[SD_UNET.name]


def call_args_of(family: Family) -> tuple[str, ...]:
    return CALL_ARGS[family.name]


def unet_call_arg(args: tuple, kwargs: dict, name: str, default=None, order: tuple[str, ...] = UNET_CALL_ARGS):
    """An argument of a diffusion model's call as a DIFFUSION_MODEL wrapper receives it, by name (`order`: the
    model's, call_args_of)."""
    i = order.index(name)
    return args[i] if len(args) > i else kwargs.get(name, default)


# A conditioning entry once ComfyUI has prepared it for sampling (comfy/sampler_helpers.py convert_cond,
# comfy/samplers.py process_conds): the uuid that transformer_options["uuids"] names it by in a UNet call, and
# its text tokens as the model gets them, in model_conds. Not its "cross_attn": the negative's copies that
# ComfyUI makes for a positive area prompt (create_cond_with_same_area_if_none) keep the positive's there,
# and its uuid.
ENTRY_UUID, ENTRY_MODEL_CONDS, MODEL_CONDS_TOKENS = "uuid", "model_conds", "c_crossattn"


def entry_tokens(entry: dict) -> torch.Tensor | None:
    cond = entry.get(ENTRY_MODEL_CONDS, {}).get(MODEL_CONDS_TOKENS)
    return None if cond is None else cond.cond



# The transformer_options key of an attention override: comfy/ldm/modules/attention.py's wrap_attn calls
# options[ATTENTION_OVERRIDE](func, *args, **kwargs) in place of every optimized attention call (SD's attn1 and
# attn2 alike), func being the attention function it replaces.
ATTENTION_OVERRIDE = "optimized_attention_override"


@contextmanager
def attention_override(options: dict, chain):
    """Within the scope, the UNet call's transformer_options hold chain(the override already there, or None):
    another node's override keeps running inside ours. chain None: nothing changes."""
    if chain is None:
        yield
        return
    had, previous = ATTENTION_OVERRIDE in options, options.get(ATTENTION_OVERRIDE)
    options[ATTENTION_OVERRIDE] = chain(previous)
    try:
        yield
    finally:
        if had:
            options[ATTENTION_OVERRIDE] = previous
        else:
            options.pop(ATTENTION_OVERRIDE, None)


def schedule_position(model_options: dict, timestep: torch.Tensor) -> SchedulePosition | None:
    """The sampler step a model evaluation belongs to, from transformer_options["sample_sigmas"] (the run's
    schedule, set by CFGGuider.inner_sample; decreasing): the last of its sigmas at or above the evaluation's
    (a sigma between two, as a two-stage sampler's, lies within that step). None without the schedule."""
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None or len(sigmas) < 2:
        return None
    at_or_above = int((sigmas.float() >= float(timestep[0]) * (1 - 1e-4)).sum())
    return SchedulePosition(min(max(at_or_above - 1, 0), len(sigmas) - 2), len(sigmas) - 1)


@dataclass(frozen=True)
class CondEntry:
    """One conditioning entry of a model evaluation, as ComfyUI's calc_cond_batch will run it."""

    entry: dict
    uuid: object
    tokens: torch.Tensor | None  # [1 or batch, tokens, channels]
    frame: tuple[int, int, int, int] | None  # (y, x, height, width) in latent pixels; None: the whole latent
    active: bool  # False outside its timestep range (ConditioningSetTimestepRange): it makes no UNet call


def cond_entries(conds: list, x_in: torch.Tensor, timestep: torch.Tensor) -> list[CondEntry]:
    """Every entry of a calc_cond_batch call's lists, with its region and whether it runs at this timestep,
    as ComfyUI's own get_area_and_mult works them out."""
    out = []
    for cond in conds:
        for entry in cond or []:
            p = comfy.samplers.get_area_and_mult(entry, x_in, timestep)
            frame = None
            if p is not None and p.area is not None:  # [height, width, y, x] for a 2-D latent
                h, w, y, x = p.area
                if (y, x, h, w) != (0, 0, *x_in.shape[-2:]):
                    frame = (y, x, h, w)
            out.append(CondEntry(entry, entry.get(ENTRY_UUID), entry_tokens(entry), frame, p is not None))
    return out


def merge_cond_passes(passes: list[tuple[list, list[torch.Tensor]]], x_in: torch.Tensor, timestep: torch.Tensor
                      ) -> list[torch.Tensor]:
    """calc_cond_batch's result for the union of several calls on parts of its lists: (conds, outputs) per
    call. calc_cond_batch returns, per list, the sum of its entries' outputs times their weights (mult, over
    their areas) divided by 1e-37 + the sum of the weights, so the sums add back up."""
    total, weight = None, None
    for conds, outs in passes:
        w = []
        for cond in conds:
            acc = torch.full_like(x_in, 1e-37)
            for entry in cond or []:
                p = comfy.samplers.get_area_and_mult(entry, x_in, timestep)
                if p is None:
                    continue
                region = acc
                if p.area is not None:
                    dims = len(p.area) // 2
                    for i in range(dims):
                        region = region.narrow(i + 2, p.area[i + dims], p.area[i])
                region += p.mult
            w.append(acc)
        sums = [o * wi for o, wi in zip(outs, w, strict=True)]
        total = sums if total is None else [a + b for a, b in zip(total, sums, strict=True)]
        weight = w if weight is None else [a + b for a, b in zip(weight, w, strict=True)]
    return [t / w for t, w in zip(total, weight, strict=True)]
