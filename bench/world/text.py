"""The world's text side: a word tokenizer framed like CLIP's, and a small transformer text encoder."""

from __future__ import annotations

import torch
from torch import nn

from .concepts import PATTERN_WORDS
from .scenes import COLOR_NAMES, IDENTIFIERS, MAX_WORDS, SHAPES

PAD, START, END = 0, 1, 2
LENGTH = MAX_WORDS + 2  # one chunk: [start] up to 14 words [end] padding
# The pattern words come last, so the first base model (pretrained without them, a shorter embedding table)
# reads every other word with the same ids.
BASE_VOCAB = ["<pad>", "<start>", "<end>", "a", "and", "on", "background", *COLOR_NAMES, *SHAPES, *IDENTIFIERS]
VOCAB = [*BASE_VOCAB, *PATTERN_WORDS.values()]
IDS = {w: i for i, w in enumerate(VOCAB)}


def tokenize(text: str) -> list[list[int]]:
    """Chunks of token ids, as residual_core.locate_concept expects (one chunk: captions are short)."""
    words = text.lower().split()
    unknown = [w for w in words if w not in IDS]
    if unknown:
        raise ValueError(f"words outside the world's vocabulary: {unknown}")
    if len(words) > MAX_WORDS:
        raise ValueError(f"caption longer than {MAX_WORDS} words: {text!r}")
    return [[START, *(IDS[w] for w in words), END] + [PAD] * (LENGTH - 2 - len(words))]


class TextEncoder(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, vocab: int = len(VOCAB)):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
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
        if int(ids.max()) >= self.token_embedding.num_embeddings:
            unknown = sorted({VOCAB[i] for i in ids.flatten().tolist() if i >= self.token_embedding.num_embeddings})
            raise ValueError(f"this base model was pretrained without the words {unknown} (bench.pretrain --patterns)")
        return self(ids)
