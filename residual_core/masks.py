"""Mask strategies: which attention map a LAG concept's mask comes from, in each block and step.

One interface, chosen by name (LagSession(..., strategy="shared")). A strategy sees, per LAG chunk, the
block's attention map to the concept's words (over the depths recorded so far in this UNet call) and
returns the (mask, score) to apply there; the session thresholds maps with the node's mask rule
(`to_mask`) and settles overlaps between concepts afterwards (resolve_overlaps: each position goes to the
covering concept with the highest relative attention, so the masks of a chain never overlap).

Sources (the first part of the name):
  per_block  each block's own map in this call (the paper's LAG; the default before strategies existed);
  shared     one map for every block: the mean over all blocks of their maps (each divided by its peak,
             resized to the block's grid) from the previous model evaluation, since the early blocks'
             proj_out runs before the late blocks' attention in the same call; in the first evaluation,
             the blocks seen so far in this call;
  lorashop   LoRAShop-like (arXiv 2505.23758): one late block's map (`block`, default the last block to
             run in a call) applied to every block: this call's where that block already ran, else the
             previous evaluation's;
  freefuse   FreeFuse-like (arXiv 2510.23515): one block's map (`block`, default the first output block)
             at one early evaluation (`step`), with attention sinks handled (the border capped at the
             interior's peak, the top-k values capped at the k-th), then held fixed for the rest of the run.
             Realised in the same run: no residual before it (steps < `step`, and the blocks before `block`
             in that step), one UNet pass per step; a true restart (a first pass to `step`, then sampling
             again from the noise with the fixed masks) is restart(), costing `step` + 1 extra UNet calls.
The nodes' default is warmup (per_block with a warm-up), picked by bench/pairs.py's numbers (README).
Modifiers ("+"-joined): ema (maps smoothed over evaluations, per block: s = 0.5 s_prev + 0.5 s_now);
warmup (no residual in the first 3 of 25 steps, or N of 25 with warmupN: a share of the run, the first
N/25 of the sampler's schedule when the caller says where an evaluation sits in it (the nodes do, so a
4-step sampler warms up for none and a 50-step one for 6); else the first N evaluations; maps are still
recorded); bias (attention bias, FreeFuse v2's idea: in a chain, this concept's words are not attended where
another concept's mask lies; see attention_bias.py).

State by lifetime: per run (reset()): the evaluation count, fixed, smoothed and previous maps; per model
evaluation (begin_evaluation()): the maps the blocks of this evaluation have given (shared, lorashop).
A "step" is a model evaluation (one per step for DDIM/Euler; Heun-type samplers make two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ResidualError

SOURCES = ("per_block", "shared", "lorashop", "freefuse")
MODIFIERS = ("ema", "warmup", "bias")
# What the nodes offer; any "source+modifier" name works in the core.
MASK_STRATEGIES = ("per_block", "shared", "lorashop", "freefuse", "ema", "warmup", "shared+ema", "shared+warmup",
                   "lorashop+warmup", "ema+warmup", "warmup8", "warmup+bias")
DEFAULT_MASK_STRATEGY = "warmup"  # the nodes' default, picked by bench/pairs.py's numbers (README)
EMA, WARMUP, FREEFUSE_STEP = 0.5, 3, 4
WARMUP_OF = 25  # warm-up steps are counted out of this many: the world's sampler's, where they were measured

Frame = tuple[int, int, int, int] | None
ToMask = Callable[[torch.Tensor], torch.Tensor]  # attention [rows, N] -> mask [rows, N], the node's mask rule


def parse_strategy(name: str) -> tuple[str, dict[str, int | None]]:
    """'shared+ema' -> ('shared', {'ema': None}); 'ema' and 'warmup' alone are per_block with that modifier;
    'warmup5': a warm-up of 5 evaluations instead of 3."""
    parts = name.split("+") if isinstance(name, str) else [name]
    source = parts[0] if parts[0] in SOURCES else "per_block"
    mods = {}
    for part in parts[1:] if parts[0] in SOURCES else parts:
        word = part.rstrip("0123456789")
        count = part[len(word):]
        if word in MODIFIERS and word not in mods and (not count or word == "warmup"):
            mods[word] = int(count) if count else None
        else:
            mods = None
            break
    if not parts[0] or mods is None:
        raise ResidualError(f"mask strategy must be one of {MASK_STRATEGIES} (or a source of {SOURCES} joined with "
                            f"'+' to modifiers of {MODIFIERS}), got {name!r}.")
    return source, mods


def check_strategy(name: str) -> None:
    parse_strategy(name)


def resize_map(values: torch.Tensor, grid: tuple[int, int], to_grid: tuple[int, int]) -> torch.Tensor:
    """[rows, h*w] on `grid` -> [rows, h'*w'] on `to_grid` over the same region: area mean when shrinking,
    nearest cell when growing."""
    if grid == to_grid:
        return values
    x = values.view(-1, 1, *grid)
    mode = "area" if to_grid[0] <= grid[0] and to_grid[1] <= grid[1] else "nearest"
    return F.interpolate(x, size=to_grid, mode=mode).reshape(values.shape[0], to_grid[0] * to_grid[1])


def relative(attn: torch.Tensor) -> torch.Tensor:
    """attention / its per-row peak (0 where the row is all zero): the score overlaps are settled by."""
    peak = attn.amax(-1, keepdim=True)
    return torch.where(peak > 0, attn / peak, 0.0)


def without_sinks(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """FreeFuse's attention-sink handling: a few positions (often on the border) soak up attention and would
    set the scale alone. Edge filter: border cells are capped at the interior's peak; top-k: the k largest
    values (k = 1/64 of the positions, at least 1) are capped at the k-th, so no single spike is the peak."""
    h, w = grid
    x = attn.view(-1, h, w)
    if h > 2 and w > 2:
        inner = x[:, 1:-1, 1:-1].amax((-1, -2), keepdim=True)
        border = torch.ones(h, w, dtype=torch.bool, device=attn.device)
        border[1:-1, 1:-1] = False
        x = torch.where(border, x.minimum(inner), x)
    flat = x.reshape(attn.shape)
    k = max(1, flat.shape[-1] // 64)
    kth = flat.topk(k, -1).values[:, -1:]
    return flat.minimum(kth)



@dataclass(frozen=True)
class SchedulePosition:
    """The sampler step a model evaluation belongs to: step (0 the first) of steps."""

    step: int
    steps: int

class MaskStrategy:
    """One concept's mask strategy (see the module's docstring). block: the block key the single-block
    sources read (None: their default); step: the evaluation freefuse captures at."""

    def __init__(self, name: str = "per_block", block: tuple | None = None, step: int = FREEFUSE_STEP):
        self.name = name
        self.source, mods = parse_strategy(name)
        self.ema = EMA if "ema" in mods else None
        self.warmup = (mods["warmup"] if mods["warmup"] is not None else WARMUP) if "warmup" in mods else 0
        self.bias = "bias" in mods  # read by hooks.attach: keep this concept's words out of the others' masks
        self.block, self.step = block, step
        self.reset()

    # ------------------------------------------------------------------ lifetimes

    def reset(self) -> None:
        """A sampling run starts (after restart(): with the masks the first pass fixed, from its first step)."""
        carry, self._carry = getattr(self, "_carry", None), None
        self.evaluations = -1  # begin_evaluation() calls; none yet counts as the first evaluation
        self.chosen = self.block  # the block a single-block source reads (its default is found as blocks run)
        self.fixed: dict[Frame, tuple[torch.Tensor, tuple[int, int]]] = {}  # freefuse: frame -> (score, grid)
        self.smooth: dict[tuple, torch.Tensor] = {}  # ema: (block, frame) -> smoothed score
        self.previous: dict[Frame, dict] = {}  # shared / lorashop: the last complete evaluation's maps
        self.building: dict[Frame, dict] = {}  # ... and this evaluation's: frame -> {block: (score, grid)}
        self.position: SchedulePosition | None = None
        self.restarted = carry is not None
        if carry is not None:
            self.fixed, self.chosen = carry

    def begin_evaluation(self, position: SchedulePosition | None = None) -> None:
        """position: the sampler step this evaluation belongs to, when the caller knows it."""
        self.evaluations += 1
        self.position = position
        if self.evaluations > 0:
            for frame, maps in self.building.items():
                if maps:
                    self.previous[frame] = maps
                    if self.source == "lorashop" and self.chosen is None:  # default: the last block to run
                        self.chosen = next(reversed(maps))
            self.building = {}

    def restart(self) -> None:
        """FreeFuse's second pass: the next run (reset()) keeps the masks this one fixed and applies them from
        its first step."""
        self._carry = (dict(self.fixed), self.chosen)

    @property
    def now(self) -> int:
        """The current evaluation's index in the run (0: the first)."""
        return max(self.evaluations, 0)

    @property
    def warming(self) -> bool:
        """In the warm-up: a step whose middle lies in the first warmup / WARMUP_OF of the schedule (3 of 25
        steps, 6 of 50, none of 4), or (no position given) one of the first `warmup` evaluations."""
        if self.position is None:
            return self.now < self.warmup
        return (self.position.step + 0.5) / self.position.steps < self.warmup / WARMUP_OF

    # ------------------------------------------------------------------ maps in, masks out

    def mask(self, block: tuple, frame: Frame, grid: tuple[int, int], attn: torch.Tensor | None, final: bool,
             to_mask: ToMask) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mask, score) [rows, h*w] for one LAG chunk in `block`, or None for the block's last applied
        mask (its attention not reached yet in this call, and nothing else to go by). attn: the chunk's
        attention map in this block over the depths recorded so far (None: none yet). final: the block's
        end (its proj_out): the map is complete and the strategy's state is updated."""
        if attn is not None and final:
            self._record(block, frame, grid, attn)
        out = self._source(frame, grid, attn, to_mask)
        if out is not None and self.ema is not None:
            out = self._smoothed(block, frame, out[1], final, to_mask)
        if out is not None and self.warming and not self.restarted:
            zero = torch.zeros_like(out[0])
            out = (zero, zero)
        return out

    def _record(self, block, frame, grid, attn) -> None:
        if self.source in ("shared", "lorashop"):
            if self.source == "lorashop" and self.chosen is not None and block != self.chosen:
                return
            self.building.setdefault(frame, {})[block] = (relative(attn), grid)
        elif self.source == "freefuse" and frame not in self.fixed and not self.restarted:
            if self.chosen is None and block[0] == "output":  # default: the first output block
                self.chosen = block
            if block == self.chosen and self.now >= self.step:
                self.fixed[frame] = (relative(without_sinks(attn, grid)), grid)

    def _source(self, frame, grid, attn, to_mask):
        rows = attn.shape[0] if attn is not None else None
        if self.source == "per_block":
            return None if attn is None else (to_mask(attn), relative(attn))
        if self.source == "freefuse":
            fixed = self.fixed.get(frame)
            if fixed is None:  # no residual before the masks are fixed
                return None if attn is None else _zeros_like(attn)
            return self._from(fixed[0], fixed[1], grid, rows, to_mask)
        maps = self.building.get(frame) or {}
        if self.source == "lorashop":  # before the default block is known (first evaluation): the latest block
            older = self.previous.get(frame) or {}
            if self.chosen is None:
                here = next(reversed(maps.values())) if maps else None
            else:
                here = maps.get(self.chosen) or older.get(self.chosen)
            if here is None:
                return None if attn is None else _zeros_like(attn)
            return self._from(here[0], here[1], grid, rows, to_mask)
        # shared: the previous evaluation's blocks, else (the first evaluation) the blocks seen so far
        chosen = self.previous.get(frame) or maps
        if not chosen:
            return None if attn is None else _zeros_like(attn)
        parts = [resize_map(s, g, grid) for s, g in chosen.values() if rows is None or s.shape[0] == rows]
        if not parts:
            return None if attn is None else _zeros_like(attn)
        mean = torch.stack(parts).mean(0)
        return to_mask(mean), relative(mean)

    def _from(self, score, from_grid, grid, rows, to_mask):
        if rows is not None and score.shape[0] != rows:  # another batch size than when it was made
            return None
        s = relative(resize_map(score, from_grid, grid))
        return to_mask(s), s

    def _smoothed(self, block, frame, score, final, to_mask):
        prev = self.smooth.get((block, frame))
        s = score if prev is None or prev.shape != score.shape else self.ema * prev + (1 - self.ema) * score
        if final:
            self.smooth[(block, frame)] = s
        return to_mask(s), relative(s)


def _zeros_like(attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros_like(attn)
    return z, z
