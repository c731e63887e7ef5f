"""Personalized residuals (Ham et al., CVPR 2024) in plain torch: nothing here imports ComfyUI."""

from . import fileformat
from .errors import ResidualError
from .hooks import Concept, attach, frozen
from .lag import MASK_RULES, CallLayout, LagSession, resolve_overlaps, threshold, token_attention
from .layers import UNMASKABLE, LoraLayers, layer_block, low_rank
from .residual import INITS, LowRankResidual, ResidualMeta, ResidualSet, rank_for
from .targets import Target, find_targets, model_family, weights_hash
from .tokens import ConceptTokens, locate_concept
from .train import PREDICTIONS, TrainConfig, fit, train_residual

__all__ = [
    "INITS", "MASK_RULES", "PREDICTIONS", "UNMASKABLE", "CallLayout", "Concept", "ConceptTokens", "LagSession", "LoraLayers",
    "LowRankResidual", "ResidualError", "ResidualMeta", "ResidualSet", "Target", "TrainConfig", "attach", "fileformat",
    "find_targets", "fit", "frozen", "layer_block", "locate_concept", "low_rank", "model_family", "rank_for",
    "resolve_overlaps", "threshold", "token_attention", "train_residual", "weights_hash",
]
