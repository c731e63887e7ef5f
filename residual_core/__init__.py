"""Personalized residuals (Ham et al., CVPR 2024) in plain torch: nothing here imports ComfyUI. What the
nodes use is exported here."""

from . import fileformat
from .errors import ResidualError, TrainingDiverged, check_range
from .family import SD_UNET, AttentionSite, Family, layer_block
from .hooks import Concept, attach, frozen
from .images import MAX_SIDE, MIN_SIDE, photo_warnings, square_batch
from .lag import MASK_RULES, CallLayout, LagSession, check_rule, resolve_overlaps, threshold, token_attention
from .residual import INITS, KINDS, UNMASKABLE, LowRankResidual, ResidualMeta, ResidualSet, low_rank, rank_for
from .targets import Target, family_label, find_targets, model_family, weights_hash
from .tokens import ConceptTokens, Tokenize, locate_concept
from .train import DEFAULT_RESOLUTION, PREDICTIONS, LossScaler, TrainConfig, fit, native_resolution, train_residual
from .words import identifier_warnings

__all__ = [
    "AttentionSite", "CallLayout", "Concept", "ConceptTokens", "DEFAULT_RESOLUTION", "Family", "INITS", "KINDS", "LagSession",
    "LossScaler", "LowRankResidual", "MASK_RULES", "MAX_SIDE", "MIN_SIDE", "PREDICTIONS",
    "ResidualError", "ResidualMeta", "ResidualSet", "SD_UNET", "Target", "Tokenize", "TrainConfig",
    "TrainingDiverged", "UNMASKABLE", "attach", "check_range", "check_rule", "family_label", "fileformat",
    "find_targets", "fit", "frozen", "identifier_warnings", "layer_block", "locate_concept", "low_rank",
    "model_family", "native_resolution", "photo_warnings", "rank_for", "resolve_overlaps", "square_batch",
    "threshold", "token_attention", "train_residual", "weights_hash",
]
