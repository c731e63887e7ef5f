"""Localized attention-guided (LAG) sampling: class-word attention -> spatial mask -> masked residual.

Per transformer block: the cross-attention probability mass that the identifier and class-word tokens
receive at each spatial position, averaged over heads and over the block's depth, is turned into a
mask M by a threshold rule, and proj_out becomes W x + b + strength * M * (dW x).

Classifier-free guidance: the mask comes from the conditional rows of a UNet call; unconditional rows
of the same sample reuse it; a call made of unconditional rows only reuses the block's last mask (and
applies no residual if there is none yet).
"""

from __future__ import annotations

import torch

from .errors import ResidualError, check_range

MASK_RULES = ("max_fraction", "median", "mean", "soft")


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, positions: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over all prompt tokens, summed over `positions`, mean over heads.

    q: [B, N, heads*d] (spatial queries), k: [B, T, heads*d] (prompt keys) -> [B, N] in float32. The
    prompt is short (77 tokens a chunk), so the scale goes on k and the probabilities come from the fused
    softmax kernel (accumulating in float32): on CPU 1.1x to 1.5x faster, run to run, than exponentiating
    only the picked columns after a logsumexp (bench/perf.py, both warmed up and timed in turns).
    """
    b, n, c = q.shape
    d = c // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.view(b, -1, heads, d).transpose(1, 2) * d**-0.5
    probs = (qh @ kh.transpose(-1, -2)).softmax(-1, dtype=torch.float32)
    return probs.index_select(-1, positions).sum(-1).mean(1)


def threshold(attn: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    """Turn per-sample attention maps [B, N] into masks in [0, 1].

    max_fraction: 1 where attention >= value * the sample's max (value in (0, 1]).
    median / mean: 1 where attention > the sample's spatial median / mean (value unused).
    soft: (attention / max) ** value, a graded mask (value = sharpness, 1 = linear).
    """
    if rule == "max_fraction":
        return (attn >= value * attn.amax(-1, keepdim=True)).to(attn.dtype)
    if rule == "median":
        return (attn > attn.median(-1, keepdim=True).values).to(attn.dtype)
    if rule == "mean":
        return (attn > attn.mean(-1, keepdim=True)).to(attn.dtype)
    if rule == "soft":  # scale-free like the others; an all-zero map gives an all-zero mask
        peak = attn.amax(-1, keepdim=True)
        return torch.where(peak > 0, attn / peak, 0.0).clamp(0, 1) ** value
    raise ResidualError(f"mask rule must be one of {MASK_RULES}, got {rule!r}.")


def check_rule(rule: str, value: float) -> None:
    if rule not in MASK_RULES:
        raise ResidualError(f"mask rule must be one of {MASK_RULES}, got {rule!r}.")
    if rule == "max_fraction":
        check_range("mask value for max_fraction", value, 0, 1, "It is a fraction of the max (0.5).", low_open=True)
    if rule == "soft":
        check_range("mask value for soft", value, 0, 10, "It is an exponent (1: linear, higher: sharper).",
                    low_open=True)


class LagSession:
    """Attention maps in, masks out, for one concept across the UNet calls of a sampling run.

    The caller announces each UNet call with begin_call(); hooks on each block's attn2.to_q/to_k feed
    record_q/record_k; the hook on proj_out asks weights() (or mask()) and reports what it applied; hooks on
    other layers of the block (a LoRA's) ask current(), which leaves the maps for proj_out.
    Everything stays on the device: no host sync per step.
    """

    def __init__(self, positions: list[int], prompt_tokens: int, rule: str = "max_fraction", value: float = 0.5):
        if not positions:
            raise ResidualError("LAG needs at least one token position (the identifier and class word).")
        check_rule(rule, value)
        self.positions = sorted(set(positions))
        self.prompt_tokens = prompt_tokens  # length of the prompt's token sequence (77 per chunk)
        self.rule, self.value = rule, value
        self._columns: dict[tuple, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything from an earlier sampling run."""
        self.last_mask: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per block: (mask, score) of cond rows
        self.mask_sum: dict[tuple, torch.Tensor] = {}  # per block: sum over calls of the cond masks
        self.mask_calls: dict[tuple, int] = {}
        self.begin_call(None)

    def begin_call(self, cond_or_uncond: list[int] | None) -> None:
        """Start a UNet call. cond_or_uncond: ComfyUI's list of batch chunks, 0 = conditional,
        1 = unconditional, each chunk the same number of rows; None = every row conditional."""
        self._chunks = list(cond_or_uncond) if cond_or_uncond else [0]
        self._maps: dict[tuple, torch.Tensor] = {}
        self._depth: dict[tuple, int] = {}
        self._q: dict[tuple, torch.Tensor] = {}

    @property
    def has_cond(self) -> bool:
        return 0 in self._chunks

    def _cond_rows(self, t: torch.Tensor) -> torch.Tensor:
        r = t.shape[0] // len(self._chunks)
        parts = [t[i * r:(i + 1) * r] for i, c in enumerate(self._chunks) if c == 0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def columns(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The key columns of our tokens; a shorter prompt beside a longer one is repeated to the lcm."""
        key = (tokens, device)
        if key not in self._columns:
            if tokens % self.prompt_tokens or max(self.positions) >= tokens:
                raise ResidualError(
                    f"The conditioning has {tokens} tokens but the LAG prompt has {self.prompt_tokens}: the "
                    "KSampler's positive input must be the LAG Sampler's conditioning output."
                )
            cols = [p + r * self.prompt_tokens for r in range(tokens // self.prompt_tokens) for p in self.positions]
            self._columns[key] = torch.tensor(cols, device=device)
        return self._columns[key]

    def record_q(self, block: tuple, q: torch.Tensor) -> None:
        if self.has_cond:
            self._q[block] = self._cond_rows(q)

    def record_k(self, block: tuple, k: torch.Tensor, heads: int) -> None:
        q = self._q.pop(block, None)
        if q is None:
            return
        attn = token_attention(q, self._cond_rows(k), heads, self.columns(k.shape[1], k.device))
        self._maps[block] = self._maps[block] + attn if block in self._maps else attn
        self._depth[block] = self._depth.get(block, 0) + 1

    def _to_rows(self, cond: torch.Tensor, batch: int) -> torch.Tensor:
        """Cond-row values -> every row of the call: cond chunks their own, uncond chunks the first's."""
        r = batch // len(self._chunks)
        out, j = [], 0
        for c in self._chunks:
            if c == 0:
                out.append(cond[j * r:(j + 1) * r])
                j += 1
            else:
                out.append(cond[:r])
        return torch.cat(out) if len(out) > 1 else out[0]

    def seen(self, block: tuple) -> int:
        """How many of the block's transformer blocks (its depth) this call has recorded attention for."""
        return self._depth.get(block, 0)

    def current(self, block: tuple, batch: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, score) [batch, tokens] for every row of the call, leaving the maps as they are: from this
        call's cond rows over the depths seen so far; a call without cond rows, or a block whose attention
        this call hasn't reached yet, reuses the block's last applied ones (zeros before the first: the base
        model). score is the attention divided by its per-image max, for settling overlaps between concepts."""
        if block in self._maps:
            attn = self._maps[block] / self._depth[block]
            peak = attn.amax(-1, keepdim=True)
            score = torch.where(peak > 0, attn / peak, 0.0)
            return self._to_rows(threshold(attn, self.rule, self.value), batch), self._to_rows(score, batch)
        last = self.last_mask.get(block)
        if last is None or last[0].shape[1] != tokens or batch % last[0].shape[0]:
            zeros = torch.zeros(batch, tokens, device=device)
            return zeros, zeros
        return tuple(t.repeat(batch // t.shape[0], 1) for t in last)

    def weights(self, block: tuple, batch: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """current() over the block's whole depth, at the end of the block (its proj_out): its maps are
        consumed, so the next call starts afresh."""
        out = self.current(block, batch, tokens, device)
        self._maps.pop(block, None)
        self._depth.pop(block, None)
        return out

    def applied(self, block: tuple, mask: torch.Tensor, score: torch.Tensor) -> None:
        """Record the mask as applied (after overlaps) for the block's next cond-free call and the preview."""
        if not self.has_cond:
            return
        r = mask.shape[0] // len(self._chunks)
        first = self._chunks.index(0) * r
        m, s = mask[first:first + r], score[first:first + r]
        self.last_mask[block] = (m, s)
        self.mask_sum[block] = self.mask_sum[block] + m if block in self.mask_sum else m.clone()
        self.mask_calls[block] = self.mask_calls.get(block, 0) + 1

    def mask(self, block: tuple, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        """[batch, tokens] mask for every row of the call, for a concept on its own (no overlaps to settle)."""
        mask, score = self.weights(block, batch, tokens, device)
        self.applied(block, mask, score)
        return mask

    def mean_masks(self) -> dict[tuple, torch.Tensor]:
        """Per block, the fraction of UNet calls in the last run that applied the residual at each position."""
        return {b: s / self.mask_calls[b] for b, s in self.mask_sum.items()}


def resolve_overlaps(masks: list[torch.Tensor], scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Several concepts in one image: where more than one mask covers a position, only the concept whose
    attention there is highest (relative to its own max over the image) keeps it."""
    if len(masks) < 2:
        return masks
    m, s = torch.stack(masks), torch.stack(scores)
    winner = torch.where(m > 0, s, float("-inf")).argmax(0)
    return [m[i] * (winner == i) for i in range(len(masks))]
