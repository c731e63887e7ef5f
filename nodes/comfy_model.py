"""Reading ComfyUI's MODEL and CLIP objects for the core: the UNet, its schedule, its tokenizer."""

from __future__ import annotations

import torch
from comfy.model_base import ModelType

from ..residual_core import ResidualError, find_targets, weights_hash
from ..residual_core.targets import Target
from ..residual_core.tokens import Tokenize

_PREDICTIONS = {ModelType.EPS: "eps", ModelType.V_PREDICTION: "v"}


def unet_of(model) -> torch.nn.Module:
    return model.get_model_object("diffusion_model")


def targets_of(model) -> list[Target]:
    return find_targets(unet_of(model))


def prediction_of(base_model) -> str:
    """'eps' or 'v' for a comfy BaseModel; other model types are not SD-style UNets."""
    kind = getattr(base_model, "model_type", None)
    if kind not in _PREDICTIONS:
        raise ResidualError(
            f"This model predicts {getattr(kind, 'name', kind)}; personalized residuals support SD1.x, SD2.x and SDXL "
            "checkpoints (epsilon or v prediction)."
        )
    return _PREDICTIONS[kind]


def base_hash(model, targets: list[Target]) -> str:
    """Fingerprint of the checkpoint's own proj_out weights, even while another clone's LoRA is merged in."""
    weights = []
    for t in targets:
        key = f"diffusion_model.{t.name}.weight"
        backup = model.backup.get(key)
        weights.append(backup.weight if backup is not None else model.get_model_object(key))
    return weights_hash(weights)


def tokenizer_of(clip) -> Tokenize:
    """The CLIP's tokenizer as chunks of token ids. SDXL's two encoders ("l", "g") share positions."""

    def tokenize(text: str) -> list[list[int]]:
        tokens = clip.tokenize(text)
        chunks = tokens["l"] if "l" in tokens else next(iter(tokens.values()))
        return [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in chunks]

    return tokenize
