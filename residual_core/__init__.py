"""Personalized residuals (Ham et al., CVPR 2024) in plain torch: nothing here imports ComfyUI. What the
nodes use is exported here."""

from . import fileformat
from .captions import PhotoPrompts, photo_prompts
from .errors import ResidualError, TrainingDiverged, check_range
from .family import CHROMA, FLUX, SD_UNET, AttentionSite, Family, layer_block
from .hooks import Attached, Concept, attach, frozen
from .images import MASK_MARKS, MAX_SIDE, MIN_SIDE, mask_warnings, photo_warnings, square_batch, square_masks
from .lag import MASK_RULES, CallLayout, LagSession, check_rule, resolve_overlaps, threshold, token_attention
from .masks import DEFAULT_MASK_STRATEGY, MASK_STRATEGIES, MaskStrategy, SchedulePosition, check_strategy
from .residual import INITS, KINDS, UNMASKABLE, LowRankResidual, ResidualMeta, ResidualSet, low_rank, rank_for
from .targets import Target, family_label, find_targets, model_family, weights_hash
from .tokens import ConceptTokens, Tokenize, locate_concept
from .train import (
    DEFAULT_RESOLUTION,
    MASK_DILATION,
    PREDICTIONS,
    LossScaler,
    TrainConfig,
    fit,
    latent_masks,
    masked_mse,
    native_resolution,
    train_residual,
)
from .words import identifier_warnings

__all__ = [
    "attach", "Attached", "AttentionSite", "CallLayout", "CHROMA", "check_range", "check_rule", "check_strategy", "Concept",
    "ConceptTokens", "DEFAULT_MASK_STRATEGY", "DEFAULT_RESOLUTION", "Family", "family_label", "fileformat",
    "find_targets", "fit", "FLUX", "frozen", "identifier_warnings", "INITS", "KINDS", "LagSession", "latent_masks",
    "layer_block", "locate_concept", "LossScaler", "low_rank", "LowRankResidual", "MASK_DILATION", "MASK_MARKS",
    "MASK_RULES", "MASK_STRATEGIES", "mask_warnings", "masked_mse", "MaskStrategy", "MAX_SIDE", "MIN_SIDE",
    "model_family", "native_resolution", "photo_prompts", "photo_warnings", "PhotoPrompts", "PREDICTIONS", "rank_for",
    "ResidualError", "ResidualMeta", "ResidualSet", "resolve_overlaps", "SchedulePosition", "SD_UNET",
    "square_batch", "square_masks",
    "Target", "threshold", "token_attention", "Tokenize", "train_residual", "TrainConfig", "TrainingDiverged",
    "UNMASKABLE", "weights_hash",
]
