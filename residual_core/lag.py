"""Localized attention-guided (LAG) sampling: class-word attention -> spatial mask -> masked residual.

Per transformer block: the cross-attention probability mass that the identifier and class-word tokens
receive at each spatial position, averaged over heads and over the block's depth, is turned into a
mask M by a threshold rule, and proj_out becomes W x + b + strength * M * (dW x).

Which rows of a UNet call make masks: a call's batch is made of chunks, one per conditioning entry
(ComfyUI batches the positive, the negative, combined or area prompts together, or runs them in separate
calls when memory is short). A chunk whose text tokens hold the concept's words, as the LAG node encoded
them, is a LAG chunk: its mask comes from its own attention to those words, wherever they sit (a prompt
concatenated to another, or repeated to a longer prompt's length). Every other chunk (the negative
prompt, another prompt combined with ours) follows: it takes the mask of the LAG chunk of the same sample,
from the same call or from an earlier call of the same model evaluation, moved to its own region of the
latent (an area prompt sees part of the image). So cond and uncond rows of one sample get the same mask in
whatever order and batching ComfyUI runs them, provided the LAG chunk runs first in each evaluation (the
ComfyUI layer, nodes/lag.py, sees to that).

Which map a LAG chunk's mask comes from (its block's own, one shared by all blocks, one block's at one
step held fixed, ...) is the session's mask strategy (masks.py); followers take whatever their LAG chunk
applied.

State by lifetime: per sampling run (reset()): the last mask applied in each block (for layers that run
before a block's first cross-attention), the sums the mask preview reads and the strategy's run state;
per model evaluation (begin_evaluation()): the masks followers take; per UNet call (begin_call()): the
chunks and the maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ResidualError, check_range
from .joint_attention import text_attention
from .masks import MaskStrategy, SchedulePosition

MASK_RULES = ("max_fraction", "median", "mean", "soft")

# Column marker of a chunk taken to hold the LAG prompt, whose key columns depend on the call's length.
_ALL = torch.empty(0, dtype=torch.long)

# A chunk's region of the latent, in latent pixels: (y, x, height, width). None is the whole latent.
Frame = tuple[int, int, int, int]


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


def move_mask(values: torch.Tensor, grid: tuple[int, int], frame: Frame | None, to_grid: tuple[int, int],
              to_frame: Frame | None, latent: tuple[int, int] | None) -> torch.Tensor:
    """values [rows, h*w] laid on `grid` over `frame` of the latent -> [rows, h'*w'] on `to_grid` over
    `to_frame`, nearest cell by cell centre; zero where to_frame reaches outside frame."""
    if frame == to_frame and grid == to_grid:
        return values
    if latent is None:
        raise ResidualError("LAG: a mask must move between regions of the latent, but the latent's size is unknown.")
    (fy, fx, fh, fw), (ty, tx, th, tw) = (f or (0, 0, *latent) for f in (frame, to_frame))
    (gh, gw), (oh, ow) = grid, to_grid
    device = values.device
    iy = ((ty + (torch.arange(oh, device=device) + 0.5) * th / oh - fy) * gh / fh).floor().long()
    ix = ((tx + (torch.arange(ow, device=device) + 0.5) * tw / ow - fx) * gw / fw).floor().long()
    inside = ((iy >= 0) & (iy < gh))[:, None] & ((ix >= 0) & (ix < gw))[None, :]
    cells = values.view(-1, gh, gw)[:, iy.clamp(0, gh - 1)][:, :, ix.clamp(0, gw - 1)]
    return (cells * inside).reshape(values.shape[0], oh * ow)


@dataclass(frozen=True)
class CallLayout:
    """How one UNet call's batch splits into chunks of equal size, one per conditioning entry.

    cond_or_uncond: ComfyUI's list, per chunk 0 for the positive and 1 for the negative; None: one
    conditional chunk. context: the call's text tokens [batch, tokens, channels]; with it, LAG chunks are
    found by their tokens, without it the conditional chunks are taken to hold the LAG prompt. frames: per
    chunk, its region of the latent (None: all whole); latent: the latent's (height, width)."""

    cond_or_uncond: list[int] | None = None
    context: torch.Tensor | None = None
    frames: list[Frame | None] | None = None
    latent: tuple[int, int] | None = None
    size: tuple[int, int] | None = None  # this call's latent (height, width): a DiT's positions are its patches


@dataclass
class _Applied:
    """A mask as a LAG chunk applied it in one block: where it lies and its values per row."""

    frame: Frame | None
    grid: tuple[int, int]
    mask: torch.Tensor  # [rows, h*w]
    score: torch.Tensor  # attention / its per-image max, for settling overlaps between concepts


class _Call:
    """One UNet call: its chunks (LAG chunks with the key columns of the concept's words, and followers)
    and the attention maps its LAG chunks have given so far."""

    def __init__(self, layout: CallLayout, columns: list[torch.Tensor | None]):
        self.layout = layout
        self.chunks = len(columns)
        self.frames = layout.frames or [None] * self.chunks
        self.lag = [(i, cols) for i, cols in enumerate(columns) if cols is not None]
        self.maps: dict[tuple, torch.Tensor] = {}  # per block: [LAG rows, positions], summed over depth
        self.depth: dict[tuple, int] = {}
        self.q: dict[tuple, torch.Tensor] = {}

    def rows(self, t: torch.Tensor, chunk: int) -> torch.Tensor:
        r = t.shape[0] // self.chunks
        return t[chunk * r:(chunk + 1) * r]


class LagSession:
    """Attention maps in, masks out, for one concept across the UNet calls of a sampling run.

    positions: the concept's words in the LAG prompt (prompt_tokens long); embeddings: the encoded prompt
    at those positions [len(positions), channels], which identify LAG chunks by their tokens (see the
    module's docstring); without them the conditional chunks are the LAG prompt. The caller announces each
    UNet call with begin_call(); hooks on each block's attn2.to_q/to_k feed record_q/record_k; the hook on
    proj_out asks weights() (or mask()) and reports what it applied; hooks on other layers of the block (a
    LoRA's) ask current(), which leaves the maps for proj_out. Everything stays on the device but the
    search for the concept's tokens (one host read per chunk of a UNet call).
    """

    def __init__(self, positions: list[int], prompt_tokens: int, rule: str = "max_fraction", value: float = 0.5,
                 embeddings: torch.Tensor | None = None, strategy: str | MaskStrategy = "per_block"):
        if not positions:
            raise ResidualError("LAG needs at least one token position (the identifier and class word).")
        check_rule(rule, value)
        self.positions = sorted(set(positions))
        self.prompt_tokens = prompt_tokens  # length of the prompt's token sequence (77 per chunk)
        self.rule, self.value = rule, value
        if embeddings is not None and embeddings.shape[0] != len(self.positions):
            raise ResidualError(f"LAG: {embeddings.shape[0]} token embeddings for {len(self.positions)} positions.")
        self.embeddings = embeddings
        self.strategy = strategy if isinstance(strategy, MaskStrategy) else MaskStrategy(strategy)
        self._columns: dict[tuple, torch.Tensor] = {}
        self.reset()

    # ------------------------------------------------------------------ lifetimes

    def reset(self) -> None:
        """Start a sampling run: forget everything from an earlier one."""
        self.last: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (block, frame) -> last applied (mask, score)
        self.mask_sum: dict[tuple, torch.Tensor] = {}  # per block: sum over calls of the whole-latent masks
        self.mask_calls: dict[tuple, int] = {}
        self.strategy.reset()
        self._new_evaluation()
        self.begin_call(CallLayout())

    def begin_evaluation(self, lag_frames: frozenset = frozenset(), position: SchedulePosition | None = None) -> None:
        """Start a model evaluation (every UNet call of one sampler step, ComfyUI's calc_cond_batch).
        lag_frames: the regions (None: the whole latent) of the LAG chunks that will run in it, so followers
        know which masks to wait for; none (every LAG entry out of its timestep range): followers get no mask,
        and the base model samples. position: the sampler step it belongs to, if known."""
        self.strategy.begin_evaluation(position)
        self._new_evaluation(lag_frames)

    def _new_evaluation(self, lag_frames: frozenset = frozenset()) -> None:
        self.evaluation: dict[tuple, list[_Applied]] = {}
        self.lag_frames = frozenset(lag_frames)
        self.done_frames: set = set()

    def _source(self, frame: Frame | None):
        """The region of the LAG chunk whose mask a follower in `frame` takes: its own region, else the whole
        latent, else any (moved to its region)."""
        if frame in self.lag_frames or not self.lag_frames:
            return frame
        return None if None in self.lag_frames else next(iter(self.lag_frames))

    def begin_call(self, layout: CallLayout) -> None:
        """Start a UNet call laid out as `layout`."""
        chunks = list(layout.cond_or_uncond) if layout.cond_or_uncond else [0]
        if layout.context is None or self.embeddings is None:
            columns = [None if c else _ALL for c in chunks]
        else:
            r = layout.context.shape[0] // len(chunks)
            columns = [self.locate(layout.context[i * r:(i + 1) * r]) for i in range(len(chunks))]
        self.call = _Call(layout, columns)

    @property
    def waiting(self) -> bool:
        """A follower of this call would take its mask from a LAG chunk of this evaluation that has not run
        yet. The caller runs the LAG chunks first instead (nodes/lag.py)."""
        call = self.call
        here = {call.frames[i] for i, _ in call.lag}
        return any(self._source(call.frames[i]) not in self.done_frames | here
                   for i in range(call.chunks) if i not in dict(call.lag)) and bool(self.lag_frames)

    # ------------------------------------------------------------------ where the concept's words are

    def columns(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The key columns of our tokens when the chunk holds the LAG prompt, repeated to `tokens` (ComfyUI
        repeats a shorter prompt beside a longer one to the lcm of their lengths)."""
        key = (tokens, device)
        if key not in self._columns:
            if tokens % self.prompt_tokens or max(self.positions) >= tokens:
                raise ResidualError(
                    f"The conditioning has {tokens} tokens but the LAG prompt has {self.prompt_tokens}: without the "
                    "prompt's embeddings, the conditional rows must hold the LAG prompt itself."
                )
            cols = [p + r * self.prompt_tokens for r in range(tokens // self.prompt_tokens) for p in self.positions]
            self._columns[key] = torch.tensor(cols, device=device)
        return self._columns[key]

    def locate(self, context: torch.Tensor) -> torch.Tensor | None:
        """The key columns where the concept's words are in `context` [rows, tokens, channels], in every row
        (each copy where the prompt is repeated, at any offset where it was concatenated), or None.

        Compared as the model sees them (cast to the context's dtype): the text encoder's output at a token
        depends only on the tokens before it, so the same words after the same prefix match, anything else
        (another prompt, a zeroed or averaged one) does not."""
        emb = self.embeddings.to(context.device, context.dtype)
        pos = torch.tensor(self.positions, device=context.device)
        span = int(pos[-1]) + 1
        if context.shape[1] < span or context.shape[2] != emb.shape[1]:
            return None
        offsets = torch.arange(context.shape[1] - span + 1, device=context.device)
        hits = torch.ones(context.shape[0], offsets.shape[0], dtype=torch.bool, device=context.device)
        for j in range(len(self.positions)):
            diff = (context[:, offsets + pos[j]] - emb[j]).abs().amax(-1)
            hits &= diff <= 1e-3 * emb[j].abs().amax() + 1e-6
        found = offsets[hits.all(0)]
        if found.numel() == 0:  # a host read: which chunk is which decides everything after
            return None
        return (found[:, None] + pos[None, :]).flatten()

    # ------------------------------------------------------------------ attention in

    def record_q(self, block: tuple, q: torch.Tensor) -> None:
        if self.call.lag:
            self.call.q[block] = q

    def record_k(self, block: tuple, k: torch.Tensor, heads: int) -> None:
        call = self.call
        q = call.q.pop(block, None)
        if q is None:
            return
        self._record(block, torch.cat([token_attention(call.rows(q, i), call.rows(k, i), heads,
                                                       cols if cols is not _ALL else self.columns(k.shape[1], k.device))
                                       for i, cols in call.lag]))

    def record_joint(self, block: tuple, q: torch.Tensor, k: torch.Tensor, text: int, positions: int) -> None:
        """A DiT block's joint attention: q, k [batch, heads, text + image (+ references), d], text first; the map
        over the first `positions` image tokens (see joint_attention.py)."""
        call = self.call
        if not call.lag:
            return
        self._record(block, torch.cat([text_attention(call.rows(q, i), call.rows(k, i), text,
                                                      cols if cols is not _ALL else self.columns(text, q.device)
                                                      )[:, :positions] for i, cols in call.lag]))

    def _record(self, block: tuple, attn: torch.Tensor) -> None:
        call = self.call
        call.maps[block] = call.maps[block] + attn if block in call.maps else attn
        call.depth[block] = call.depth.get(block, 0) + 1

    def seen(self, block: tuple) -> int:
        """How many of the block's transformer blocks (its depth) this call has recorded attention for."""
        return self.call.depth.get(block, 0)

    def word_masks(self, block: tuple, tokens: int, positions: int, device: torch.device
                   ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """For the attention bias between concepts (attention_bias.py): per LAG chunk of this call whose region
        has applied a mask in `block` (its last one, from an earlier call), (chunk, the key columns of the
        concept's words among `tokens`, that mask [rows, positions])."""
        call, out = self.call, []
        for i, cols in call.lag:
            last = self.last.get((block, call.frames[i]))
            if last is None or last[0].shape[1] != positions:
                continue
            out.append((i, cols if cols is not _ALL else self.columns(tokens, device), last[0]))
        return out

    # ------------------------------------------------------------------ masks out

    def current(self, block: tuple, batch: int, grid: tuple[int, int], device: torch.device, final: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, score) [batch, h*w] for every row of the call, leaving the maps as they are. LAG chunks: from
        their maps over the depths seen so far, or (a block whose attention this call hasn't reached yet) the
        block's last applied ones, zeros before the first. Followers: their sample's LAG chunk's, from this
        call or this evaluation. score is the attention divided by its per-image max. Which map makes a LAG
        chunk's mask is the strategy's choice; final: the block's end, where the strategy records the block's
        complete map."""
        call = self.call
        r = batch // call.chunks
        tokens = grid[0] * grid[1]
        own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        attn = call.maps[block] / call.depth[block] if block in call.maps else None
        for j, (i, _) in enumerate(call.lag):
            got = self.strategy.mask(block, call.frames[i], grid, None if attn is None else attn[j * r:(j + 1) * r],
                                     final, self._to_mask)
            if got is not None:
                own[i] = got
        parts = []
        for i in range(call.chunks):
            frame = call.frames[i]
            if i in own:
                parts.append(own[i])
            elif any(j == i for j, _ in call.lag):
                last = self.last.get((block, frame))
                parts.append(last if last is not None and last[0].shape == (r, tokens) else _zeros(r, tokens, device))
            else:
                parts.append(self._follow(block, r, grid, frame, own, device))
        return tuple(torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts, strict=True))

    def _to_mask(self, attn: torch.Tensor) -> torch.Tensor:
        return threshold(attn, self.rule, self.value)

    def _follow(self, block, rows, grid, frame, own, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A follower's (mask, score): from its source LAG chunk (see _source) in this call, else from this
        evaluation, moved to the follower's region; zeros when there is none."""
        call, source = self.call, self._source(frame)
        here = {}  # the first LAG chunk of each region in this call (chunks of one call share the grid)
        for i, _ in call.lag:
            if i in own:
                here.setdefault(call.frames[i], own[i])
        if frame in here or source in here:
            key = frame if frame in here else source
            pick = (key, grid, *here[key])
        else:
            applied = self.evaluation.get(block, [])
            a = next((a for a in applied if a.frame == source), applied[0] if applied else None)
            if a is None or a.mask.shape[0] != rows:
                return _zeros(rows, grid[0] * grid[1], device)
            pick = (a.frame, a.grid, a.mask, a.score)
        return tuple(move_mask(v, pick[1], pick[0], grid, frame, call.layout.latent) for v in pick[2:])

    def weights(self, block: tuple, batch: int, grid: tuple[int, int], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """current() over the block's whole depth, at the end of the block (its proj_out): its maps are
        consumed, so the next call starts afresh."""
        out = self.current(block, batch, grid, device, final=True)
        self.call.maps.pop(block, None)
        self.call.depth.pop(block, None)
        return out

    def applied(self, block: tuple, grid: tuple[int, int], mask: torch.Tensor, score: torch.Tensor) -> None:
        """Record the LAG chunks' rows of the mask as applied (after overlaps): for followers, for the block's
        layers before cross-attention in the next call, and for the preview (whole-latent masks)."""
        call = self.call
        r = mask.shape[0] // call.chunks
        for i, _ in call.lag:
            frame = call.frames[i]
            m, s = mask[i * r:(i + 1) * r], score[i * r:(i + 1) * r]
            self.last[(block, frame)] = (m, s)
            kept = [a for a in self.evaluation.get(block, []) if (a.frame, a.grid) != (frame, grid)]
            self.evaluation[block] = [*kept, _Applied(frame, grid, m, s)]
            self.done_frames.add(frame)
            if frame is None:
                total = self.mask_sum.get(block)
                self.mask_sum[block] = m.clone() if total is None or total.shape != m.shape else total + m
                self.mask_calls[block] = 1 if total is None or total.shape != m.shape else self.mask_calls[block] + 1

    def mask(self, block: tuple, batch: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[batch, h*w] mask for every row of the call, for a concept on its own (no overlaps to settle)."""
        mask, score = self.weights(block, batch, grid, device)
        self.applied(block, grid, mask, score)
        return mask

    def mean_masks(self) -> dict[tuple, torch.Tensor]:
        """Per block, the fraction of UNet calls in the last run that applied the residual at each position
        of the whole latent."""
        return {b: s / self.mask_calls[b] for b, s in self.mask_sum.items()}


def _zeros(rows: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros(rows, tokens, device=device)
    return z, z


def resolve_overlaps(masks: list[torch.Tensor], scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Several concepts in one image: where more than one mask covers a position, only the concept whose
    attention there is highest (relative to its own max over the image) keeps it."""
    if len(masks) < 2:
        return masks
    m, s = torch.stack(masks), torch.stack(scores)
    winner = torch.where(m > 0, s, float("-inf")).argmax(0)
    return [m[i] * (winner == i) for i in range(len(masks))]
