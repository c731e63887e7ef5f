"""LAG LoRA: any LoRA file (kohya, diffusers or ComfyUI layout), applied where its trigger word attends.

ComfyUI's own parser reads the file (comfy.lora.load_lora, as the stock LoraLoader does). The plain LoRA
layers a spatial mask can apply to (see residual_core/family.py) join the chain's LAG patch as a ResidualSet
and are masked per transformer block; every other layer (cross-attention to_k/to_v, layers outside the
transformer blocks, the text encoder's, and LoHa/LoKr/3x3-conv/DoRA layers anywhere) is either patched
into the weights as the stock loader does ("apply globally") or left out ("skip").
"""

from __future__ import annotations

import logging
import os

import comfy.lora
import comfy.lora_convert
import folder_paths
from comfy_api.latest import io

from ..residual_core import ResidualError, ResidualSet, family_label, fileformat, low_rank, model_family
from .advice import in_ui_words
from .comfy_model import LoraWeights, check_companions, family_of, lora_weights, unet_of
from .lag import LEGACY_STRATEGY, LagConcept, check_settings, mask_and_window_inputs, sigma_window, with_concept
from .residual_type import CATEGORY

UNMASKABLE_LAYERS = ("apply globally", "skip")
_UNET = "diffusion_model."


def lora_names() -> list[str]:
    return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")]


def _name(key) -> str:
    return key[0] if isinstance(key, tuple) else key  # ComfyUI keys a patch on part of a weight as (name, offset, ...)


def _maskable_factors(key, patch) -> LoraWeights | None:
    """The factors of a plain LoRA patch on a whole weight; None for anything else."""
    w = lora_weights(patch)
    if not (isinstance(key, str) and key.endswith(".weight") and w is not None):
        return None
    if w.mid is not None or w.dora_scale is not None or w.reshape is not None:
        return None
    if any(t.ndim == 4 and t.shape[2:] != (1, 1) for t in (w.up, w.down)):
        return None  # a 3x3 conv (LoCon)
    return w


def _check_shape(key: str, w: LoraWeights, weight, family: str) -> None:
    ours, theirs = (w.up.shape[0], w.down.shape[1:].numel()), (weight.shape[0], weight.shape[1:].numel())
    if w.mid is None and w.reshape is None and ours != theirs:
        raise ResidualError(f"This LoRA was made for another model: its layer {key[len(_UNET):-len('.weight')]} is "
                            f"{ours[0]}x{ours[1]}, the model's ({family}) is {theirs[0]}x{theirs[1]}. Pick a LoRA made "
                            f"for {family}.")


def split_lora(model, clip, sd: dict, targets, family) -> tuple[dict, dict, dict]:
    """The file's layers as (masked: UNet path -> LowRankResidual, unmaskable UNet patches, text-encoder patches),
    the patches keyed as ComfyUI's add_patches takes them. A patch on part of a weight (diffusers' Flux LoRAs: q,
    k and v each on a slice of Flux's fused qkv or linear1) is unmaskable."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if hasattr(clip, "cond_stage_model"):
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(sd), key_map)
    label = family_label(model_family(targets))
    masked, unmaskable, text_encoder = {}, {}, {}
    for key, patch in patches.items():
        if not _name(key).startswith(_UNET):
            text_encoder[key] = patch
            continue
        path = _name(key)[len(_UNET):].rsplit(".", 1)[0]
        weight = model.get_model_object(_name(key))
        if lora_weights(patch) is not None and isinstance(key, str):
            _check_shape(key, lora_weights(patch), weight, label)
        factors = _maskable_factors(key, patch)
        if factors is None or family.mask_block(path, targets) is None:
            unmaskable[key] = patch
            continue
        masked[path] = low_rank(factors.up.float(), factors.down.float(), factors.alpha, conv=weight.ndim == 4)
    if not masked:
        if not unmaskable and not text_encoder:
            raise ResidualError(f"This LoRA has no layers for this model ({label}): none of its {len(sd)} tensors "
                                f"names one of its layers (e.g. {min(sd, default='nothing')!r}). It was made for "
                                f"another model; pick a LoRA made for {label}.")
        where = "only the text encoder" if not unmaskable else \
            f"no layer inside the transformer blocks that a mask can apply to (e.g. {_name(min(unmaskable, key=_name))})"
        raise ResidualError(f"This LoRA changes {where}, so LAG has nothing to mask. Load it with the stock LoraLoader, "
                            "which applies it everywhere.")
    return masked, unmaskable, text_encoder


class LagLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualLAGLoRA",
            display_name="LAG LoRA",
            category=CATEGORY,
            description=(
                "Apply any LoRA (kohya, diffusers or ComfyUI layout; a DreamBooth-style subject LoRA) regionally, "
                "only where its trigger word and class word attend, like LAG Sampler does for a personalized "
                "residual: its layers inside the transformer blocks are masked "
                "per block, so the rest of the image keeps the base model. Layers that can't be masked (the "
                "cross-attention key/value layers, which act on the prompt; layers outside the transformer blocks; "
                "the text encoder's) are applied everywhere or skipped. Chains with LAG Sampler and other LAG LoRAs "
                "(several concepts in one image). Connect model and positive to the KSampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to sample with (the checkpoint's, or after other patches, "
                               "LAG Sampler and LAG LoRA included)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: encodes the prompt and finds the trigger word's "
                              "tokens."),
                io.Combo.Input("lora_name", options=lora_names(), tooltip="A .safetensors LoRA in models/loras/, made "
                               "for this model's family (SD1.x, SD2.x, SDXL or Flux.1)."),
                io.String.Input("trigger_word", default="sks", tooltip="The LoRA's trigger word (identifier), as it "
                                "appears in the prompt, e.g. 'sks' or 'ohwx'."),
                io.String.Input("class_word", default="dog", tooltip="The class of the LoRA's subject, written right "
                                "after the trigger word in the prompt ('sks dog', 'ohwx woman')."),
                io.String.Input("prompt", multiline=True, default="a photo of a sks dog on the beach",
                                tooltip="The positive prompt. It must contain the trigger word followed by the class "
                                "word, e.g. 'a sks dog' (weights like '(sks dog:1.2)' are fine)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Multiplies the LoRA, as the stock loader's strength does."),
                io.Combo.Input("unmaskable_layers", options=list(UNMASKABLE_LAYERS), default=UNMASKABLE_LAYERS[0],
                               tooltip="The layers a spatial mask can't apply to (cross-attention to_k/to_v, which act "
                               "on the prompt's tokens; layers outside the transformer blocks; the text encoder's; "
                               "LoHa/LoKr/3x3-conv layers; on Flux the text stream, the modulation layers and the text "
                               "rows of the single blocks): 'apply globally' patches them in everywhere as the stock "
                               "loader does (at every step); 'skip' leaves them out (more local, maybe less like the "
                               "LoRA)."),
                *mask_and_window_inputs("the masked layers", "Layers applied globally act at every step."),
            ],
            outputs=[
                io.Model.Output("lag_model", display_name="model", tooltip="The model with the LoRA; the input MODEL is "
                                "unchanged."),
                io.Conditioning.Output("positive", display_name="positive", tooltip="The encoded prompt (with the "
                                       "LoRA's text-encoder layers when they are applied): the KSampler's positive "
                                       "input."),
                io.Clip.Output("lag_clip", display_name="clip", tooltip="The CLIP with the LoRA's text-encoder layers "
                               "when they are applied (else the input CLIP): encode the negative prompt with it, as "
                               "after the stock LoraLoader."),
            ],
        )

    @classmethod
    @in_ui_words
    def execute(cls, model, clip, lora_name, trigger_word, class_word, prompt, strength, unmaskable_layers,
                mask_rule, mask_value, start_percent, end_percent, mask_strategy=LEGACY_STRATEGY) -> io.NodeOutput:
        check_settings(strength, start_percent, end_percent, mask_rule, mask_value, mask_strategy)
        for name, word in (("trigger_word", trigger_word), ("class_word", class_word)):
            if not word.strip():
                raise ResidualError(f"{name} is empty: LAG finds the LoRA's subject in the prompt by its trigger word "
                                    "and class word (e.g. 'ohwx' and 'woman' for the prompt 'a photo of ohwx woman').")
        if unmaskable_layers not in UNMASKABLE_LAYERS:
            raise ResidualError(f"unmaskable_layers must be one of {list(UNMASKABLE_LAYERS)}, got {unmaskable_layers!r}.")
        if not lora_name.lower().endswith(".safetensors"):
            raise ResidualError(f"lora_name {lora_name!r}: only .safetensors LoRAs are read (other formats can run code "
                                "when loaded). Convert it, or pick another LoRA.")
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise ResidualError(f"No LoRA {lora_name!r} in models/loras/. Pick one from the list (press R in the UI to "
                                "refresh it).")
        family = family_of(model)
        check_companions(model, family, clip)
        targets = family.targets(unet_of(model))
        masked, unmaskable, text_encoder = split_lora(model, clip, fileformat.read_tensors(path), targets, family)
        apply_everywhere = unmaskable_layers == "apply globally"
        window = sigma_window(model, start_percent, end_percent)
        logging.info("LAG LoRA %s: %d layers masked, %d other diffusion-model and %d text-encoder layers %s.",
                     os.path.basename(lora_name), len(masked), len(unmaskable), len(text_encoder),
                     "applied everywhere" if apply_everywhere else "skipped")
        if apply_everywhere and window and unmaskable:
            logging.warning("LAG LoRA %s: start/end percent gate the masked layers only; the %d layers applied "
                            "everywhere act at every step.", lora_name, len(unmaskable))
        if apply_everywhere and text_encoder:
            clip = clip.clone()
            clip.add_patches(text_encoder, strength)
        layers = ResidualSet(masked, kind="lora", unmaskable="global" if apply_everywhere else "skip")  # Flux: text rows
        concept = LagConcept(layers, trigger_word, class_word, strength, (mask_rule, mask_value), window, mask_strategy)
        m, positive = with_concept(model, concept, clip, prompt, targets)
        if apply_everywhere and unmaskable:
            m.add_patches(unmaskable, strength)
        return io.NodeOutput(m, positive, clip)
