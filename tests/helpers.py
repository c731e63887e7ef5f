"""Small fixtures for tier-1 tests: SD-shaped UNets in plain torch and a word tokenizer shaped like CLIP's."""

from __future__ import annotations

import re

import torch
from personalized_residuals.bench.world.unet import SDUNet

START, END, CHUNK = 1, 2, 77


def tiny_unet(use_linear: bool, depth: int = 1, seed: int = 0, context_dim: int = 16) -> SDUNet:
    torch.manual_seed(seed)
    return SDUNet(model_channels=16, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=2,
                  transformer_depth=depth, context_dim=context_dim, use_linear=use_linear)


class WordTokenizer:
    """CLIP-like framing ([start] words [end] padding, 77 per chunk, 75 words a chunk) over whole words.

    Lower-cases, drops A1111 weight syntax, and splits words listed in `multi` into several tokens, so
    the tests see multi-token words ("teddybear" -> teddy, bear) as with a BPE tokenizer.
    """

    def __init__(self, multi: dict[str, list[str]] | None = None):
        self.vocab: dict[str, int] = {}
        self.multi = multi or {}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, 3 + len(self.vocab))

    def __call__(self, text: str) -> list[list[int]]:
        text = re.sub(r":[0-9.]+\)", ")", text.lower())
        words = re.findall(r"[a-z0-9]+", text)
        ids = [self._id(p) for w in words for p in self.multi.get(w, [w])]
        chunks = [ids[i:i + CHUNK - 2] for i in range(0, len(ids), CHUNK - 2)] or [[]]
        return [[START, *c, END] + [END] * (CHUNK - 2 - len(c)) for c in chunks]
