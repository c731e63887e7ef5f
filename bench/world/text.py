"""The world's text side: a word tokenizer framed like CLIP's, and a small transformer text encoder."""

from __future__ import annotations

import torch
from torch import nn

from .scenes import COLOR_NAMES, IDENTIFIERS, SHAPES

PAD, START, END = 0, 1, 2
LENGTH = 16  # one chunk: [start] up to 14 words [end] padding
VOCAB = ["<pad>", "<start>", "<end>", "a", "and", "on", "background", *COLOR_NAMES, *SHAPES, *IDENTIFIERS]
IDS = {w: i for i, w in enumerate(VOCAB)}


def tokenize(text: str) -> list[list[int]]:
    """Chunks of token ids, as residual_core.locate_concept expects (one chunk: captions are short)."""
    words = text.lower().split()
    unknown = [w for w in words if w not in IDS]
    if unknown:
        raise ValueError(f"words outside the world's vocabulary: {unknown}")
    if len(words) > LENGTH - 2:
        raise ValueError(f"caption longer than {LENGTH - 2} words: {text!r}")
    return [[START, *(IDS[w] for w in words), END] + [PAD] * (LENGTH - 2 - len(words))]


class TextEncoder(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.token_embedding = nn.Embedding(len(VOCAB), dim)
        self.position_embedding = nn.Parameter(torch.zeros(LENGTH, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, LENGTH] -> context [B, LENGTH, dim]. `embeddings` replaces the token lookup (for
        Textual Inversion, which trains one row of it)."""
        x = (self.token_embedding(ids) if embeddings is None else embeddings) + self.position_embedding
        return self.final_norm(self.encoder(x, src_key_padding_mask=ids == PAD))

    def encode(self, captions: list[str]) -> torch.Tensor:
        device = self.position_embedding.device
        ids = torch.tensor([tokenize(c)[0] for c in captions], device=device)
        return self(ids)
