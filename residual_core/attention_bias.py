"""Attention bias between the concepts of a LAG chain (FreeFuse v2's idea, arXiv 2510.23515): where another
concept's mask lies, a concept's words are (almost) not attended, so the base model's own cross-attention
stops painting one subject's words onto the other's object, as the masks already keep the residuals apart.

Per cross-attention call of a block: an additive bias on the logits, [batch, 1, positions, tokens], zero but
in the LAG chunks' rows at the key columns of each concept with the `bias` modifier, where it is log(1 - m),
m the largest of the other concepts' masks last applied in this block (from their previous call, after
overlaps were settled: this call's maps are not made yet), floored at log(1e-4). A binary mask scales those
words' attention weights there by 1e-4 before the softmax renormalises; a soft one by (1 - m). The masks
themselves are made from the unbiased attention (hooks on to_q/to_k), as FreeFuse makes them.

The bias reaches the attention through an override of the attention function with ComfyUI's signature,
`override(func, q, k, v, heads, mask=None, ..., skip_reshape=False)`, chained in front of any override
already set; hooks.attach tells it which block's cross-attention runs next (the block's attn2.to_k hook).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .lag import LagSession

FLOOR = math.log(1e-4)
_MASK_ARG = 4  # override(func, q, k, v, heads, mask, ...): where a positional mask sits in args

AttentionFn = Callable[..., torch.Tensor]


class AttentionBias:
    """The bias of a chain's LAG sessions (one per concept, in chain order; biased: whether each concept's
    words are kept out of the others' masks), for the UNet calls of one attach() scope."""

    def __init__(self, sessions: list[LagSession], biased: list[bool]):
        self.sessions, self.biased = sessions, biased
        self.pending: tuple[tuple, int] | None = None  # (block, tokens) of the cross-attention about to run

    def expect(self, block: tuple, tokens: int) -> None:
        """The next attention call is `block`'s cross-attention over `tokens` keys."""
        self.pending = (block, tokens)

    def logits(self, block: tuple, batch: int, positions: int, tokens: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor | None:
        """The additive bias [batch, 1, positions, tokens] for `block`, or None where nothing is biased."""
        held = [s.word_masks(block, tokens, positions, device) for s in self.sessions]
        chunks = self.sessions[0].call.chunks
        rows = batch // chunks
        bias = None
        for chunk in range(chunks):
            here = {j: (cols, m) for j, h in enumerate(held) for i, cols, m in h if i == chunk and m.shape[0] == rows}
            if len(here) < 2:
                continue
            for j, (cols, _) in here.items():
                if not self.biased[j]:
                    continue
                others = torch.stack([m for o, (_, m) in here.items() if o != j]).amax(0)  # [rows, positions]
                if bias is None:
                    bias = torch.zeros(batch, 1, positions, tokens, device=device, dtype=dtype)
                part = bias[chunk * rows:(chunk + 1) * rows, 0]
                part[:, :, cols] += (1 - others).clamp(min=0).log().clamp(min=FLOOR).to(dtype)[:, :, None]
        return bias

    def override(self, previous: AttentionFn | None = None) -> AttentionFn:
        """An attention override that adds the bias to the block's cross-attention and calls `previous` (another
        node's override) or the attention function itself; every other attention call passes through as is."""

        def attend(func, *args, **kwargs):
            pending, self.pending = self.pending, None
            q, k = args[0], args[1]
            token_dim = 2 if kwargs.get("skip_reshape", False) else 1  # [B, H, L, d] or [B, L, H*d]
            if pending is not None and pending[1] == k.shape[token_dim]:
                bias = self.logits(pending[0], q.shape[0], q.shape[token_dim], k.shape[token_dim], q.device, q.dtype)
                if bias is not None:
                    args, kwargs = _with_mask(args, kwargs, bias)
            return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

        return attend


def _with_mask(args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """The call's arguments with `bias` added to its mask (positional or keyword; bool or additive; [T'], [N, T],
    [B, N, T] or [B, H, N, T])."""
    positional = len(args) > _MASK_ARG
    mask = args[_MASK_ARG] if positional else kwargs.get("mask")
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~mask, float("-inf"))
        while mask.ndim < 3:
            mask = mask.unsqueeze(0)
        bias = bias + (mask.unsqueeze(1) if mask.ndim == 3 else mask).to(bias.dtype)
    if positional:
        return (*args[:_MASK_ARG], bias, *args[_MASK_ARG + 1:]), kwargs
    return args, {**kwargs, "mask": bias}
