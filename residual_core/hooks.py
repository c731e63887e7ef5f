"""How residuals enter a UNet or a DiT: forward hooks, attached for a scope and removed after it.

Hooks add `strength * M * (dW x)` to a layer's output (summed over concepts when there are several):
each layer of a ResidualSet (every proj_out for a residual, any Linear or 1x1 conv for a LoRA's). They
replace no module or weight, so weight patches on the same layer (a stock LoRA), attention patches and
offloading keep working, and the model is exactly as before once the scope ends. Training, LAG sampling
and global sampling all go through attach().

Where LAG's maps come from is the family's (family.py): on a UNet, hooks on each block's cross-attention
query and key modules; on a DiT with joint attention (Flux), the block's attention call itself, through an
attention override the caller installs for the scope (Attached), as it does the attention bias's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .attention_bias import AttentionBias, AttentionFn
from .errors import ResidualError
from .family import ALL_ROWS, SD_UNET, TEXT_THEN_IMAGE, Family, _submodule
from .lag import CallLayout, LagSession, resolve_overlaps
from .residual import LowRankResidual, ResidualSet
from .targets import Target


@dataclass
class Concept:
    """One residual on a UNet: applied everywhere, or (with a LagSession) where its words attend.

    residual: a ResidualSet: the paper's proj_out residuals, or a LoRA's layers anywhere."""

    residual: ResidualSet
    strength: float = 1.0
    lag: LagSession | None = None


@dataclass(frozen=True)
class _Entry:
    """One concept's layer on a hooked module."""

    concept: int  # index into attach()'s concepts: whose mask it takes
    layer: LowRankResidual
    strength: float
    masked: bool  # times its concept's LAG mask in the module's block; else everywhere
    text: bool = True  # on a layer over [text; image] tokens (Flux's single blocks), masked: the text rows get it


class _BlockMasks:
    """The LAG concepts' masks in each block during one UNet call, overlaps settled. Every hooked layer of
    a block shares them; they are recomputed only when the block's attention maps have grown."""

    def __init__(self, concepts: list[Concept]):
        self.lagged = [(i, c.lag) for i, c in enumerate(concepts) if c.lag is not None]
        self._cache: dict[tuple, tuple] = {}

    def get(self, block: tuple, batch: int, grid: tuple[int, int], device: torch.device, final: bool
            ) -> dict[int, torch.Tensor]:
        """Concept index -> mask [batch, h*w]. final: the block's end (its proj_out), where the maps are
        complete: they are consumed and the masks recorded as applied."""
        if final:
            pairs = [s.weights(block, batch, grid, device) for _, s in self.lagged]
        else:
            stamp = (batch, grid, *(s.seen(block) for _, s in self.lagged))
            cached = self._cache.get(block)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            pairs = [s.current(block, batch, grid, device) for _, s in self.lagged]
        masks = resolve_overlaps([p[0] for p in pairs], [p[1] for p in pairs])
        out = {i: m for (i, _), m in zip(self.lagged, masks, strict=True)}
        if final:
            for (_, s), mask, (_, score) in zip(self.lagged, masks, pairs, strict=True):
                s.applied(block, grid, mask, score)
            self._cache.pop(block, None)
        else:
            self._cache[block] = (stamp, out)
        return out


def _on_rows(mask: torch.Tensor, rows: str, length: int, text: int, text_value: float) -> torch.Tensor:
    """A block's mask [b, positions] on a layer's token rows [b, length]: the positions are all of them
    (ALL_ROWS), the first ones (IMAGE_FIRST), or those after `text` text rows, which get text_value
    (TEXT_THEN_IMAGE); rows after the positions (reference latents) get none."""
    if rows == ALL_ROWS:
        return mask
    b, n = mask.shape
    start = text if rows == TEXT_THEN_IMAGE else 0
    parts = [mask.new_full((b, start), text_value)] if start else []
    parts += [mask, mask.new_zeros(b, length - start - n)]
    return torch.cat(parts, 1)


def _layer_hook(path: str, entries: list[_Entry], masks: _BlockMasks, block: tuple | None, final: bool,
                grids: dict[tuple, tuple[int, int, int]], rows: str = ALL_ROWS, text: int = 0):
    """Adds each entry's delta to the module's output; masked ones times their concept's mask in `block`.
    final: the module is the block's residual layer (SD: its proj_out). rows: which of a token layer's rows
    are the block's positions (family.py); text: the text rows before them (TEXT_THEN_IMAGE)."""
    lagged = block is not None and bool(masks.lagged) and (final or any(e.masked for e in entries))

    def hook(module, args, out):
        x = args[0]
        if x.ndim == 4:  # a conv: [B, C, H, W]
            b, _, h, w = x.shape
            shape, length = (b, 1, h, w), h * w
        else:  # a linear layer on tokens: [B, N, C]
            b, length = x.shape[0], x.shape[1]
            shape = (b, length, 1)
        lag = None
        if lagged:
            seen = grids.get(block)  # (batch, height, width) of the block's positions in this call
            n = None if seen is None else seen[1] * seen[2]
            fits = n == length if rows == ALL_ROWS else n is not None and length >= n + (text if rows == TEXT_THEN_IMAGE else 0)
            if seen is not None and seen[0] == b and fits:
                lag = masks.get(block, b, seen[1:], x.device, final)
            else:  # another patch merged or tiled the tokens (ToMe, HyperTile): positions can't be matched
                warnings.warn(f"LAG: layer {path} sees {b}x{length} tokens, not its block's {seen} positions (another "
                              "patch merges or tiles tokens); its delta is left out there.", stacklevel=1)
        for e in entries:
            if e.masked and lag is None:
                continue
            delta = e.layer.delta(x)
            if e.masked:
                weight = _on_rows(lag[e.concept], rows, length, text, float(e.text))
                delta = delta * weight.view(shape).to(delta.dtype)
            out = out + (delta * e.strength if e.strength != 1.0 else delta)
        return out

    return hook


def _grid_hook(block: tuple, grids: dict):
    """Records the (batch, height, width) of a SpatialTransformer's input, the grid its LAG masks are laid on."""

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        grids[block] = (x.shape[0], x.shape[2], x.shape[3])

    return pre_hook


def _attention_hooks(block: tuple, heads: int, sessions: list[LagSession], bias: AttentionBias | None):
    """Hooks on a transformer block's cross-attention projections that hand q and k to every session, and tell
    the attention bias whose cross-attention runs next (they return None: the outputs are left as they are)."""

    def q_hook(module, args, q):
        for s in sessions:
            s.record_q(block, q)

    def k_hook(module, args, k):
        for s in sessions:
            s.record_k(block, k, heads)
        if bias is not None:
            bias.expect(block, k.shape[1])

    return q_hook, k_hook


class _JointMaps:
    """DiTs (Flux): each block's map from its one attention call, through an attention override; the block's
    forward pre-hook records its grid (the patches of the call's latent) and says whose call comes next."""

    def __init__(self, sessions: list[LagSession], grids: dict, grid: tuple[int, int], text: int):
        self.sessions, self.grids, self.grid, self.text = sessions, grids, grid, text
        self.pending: tuple | None = None

    def pre_hook(self, block: tuple):
        def hook(module, args, kwargs):
            x = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
            self.grids[block] = (x.shape[0], *self.grid)
            self.pending = block

        return hook

    def override(self, previous: AttentionFn | None = None) -> AttentionFn:
        positions = self.grid[0] * self.grid[1]

        def attend(func, *args, **kwargs):
            block, self.pending = self.pending, None
            q, k = args[0], args[1]  # [B, heads, text + image (+ references), d], after RoPE
            if block is not None and kwargs.get("skip_reshape") and q.shape[2] >= self.text + positions:
                for s in self.sessions:
                    s.record_joint(block, q, k, self.text, positions)
            return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

        return attend


def _chain(*makers):
    """One override maker from several: each wraps the ones before it, the first wraps `previous`."""
    makers = [m for m in makers if m is not None]
    if not makers:
        return None

    def chain(previous: AttentionFn | None) -> AttentionFn:
        for make in makers:
            previous = make(previous)
        return previous

    return chain


@dataclass(frozen=True)
class Attached:
    """What attach() gives its scope. attention_override: None, or a function of the attention override already
    in force (None: none) that returns the one to install for the scope (ComfyUI's
    transformer_options["optimized_attention_override"]): the chain's attention bias (attention_bias.py)."""

    attention_override: Callable[[AttentionFn | None], AttentionFn] | None = None


@contextmanager
def attach(
    unet: nn.Module,
    concepts: list[Concept],
    call: CallLayout | None = None,
    family: Family = SD_UNET,
    targets: list[Target] | None = None,
):
    """Within the scope, every layer of each concept's residual adds its delta to its module's output (a
    residual's on every proj_out, a LoRA's on their modules), times the concept's strength, and, when
    the concept has a LagSession, times its mask (see family.py for which layers a mask applies to, and
    when). Several concepts share an image, each masked by its own words; where LAG masks overlap, the
    concept that attends most wins.

    call: how the batch splits into chunks, for LAG (see CallLayout); None means every row is the LAG prompt's.
    LAG on a DiT (family.joint) needs the call's text tokens and latent size in it (CallLayout.context, .size).
    One scope per UNet call when the layout changes per call. targets: family.targets(unet), when the caller
    has them already. Yields an Attached: the caller installs its attention override, if any, for the scope.
    """
    targets = targets if targets is not None else family.targets(unet)
    entries: dict[str, list[_Entry]] = {}
    blocks: dict[str, tuple | None] = {}
    for i, concept in enumerate(concepts):
        lagged = concept.lag is not None
        for path, (layer, block) in concept.residual.placement(unet, targets, lagged, family).items():
            entries.setdefault(path, []).append(_Entry(i, layer, concept.strength, lagged and block is not None,
                                                       concept.residual.unmaskable == "global"))
            blocks[path] = block
        if lagged:
            concept.lag.begin_call(call or CallLayout())
    sessions = [c.lag for c in concepts if c.lag is not None]
    biased = [s.strategy.bias for s in sessions]
    bias = AttentionBias(sessions, biased) if len(sessions) > 1 and any(biased) else None
    finals = {t.name for t in targets}
    if sessions:  # every block's residual layer ends its maps, whether or not a concept has a layer there
        for t in targets:
            entries.setdefault(t.name, [])
            blocks[t.name] = t.block
    masks, grids = _BlockMasks(concepts), {}
    joint, text = None, 0
    if sessions and family.joint is not None:
        if call is None or call.context is None or call.size is None:
            raise ResidualError(f"LAG on {family.name} needs the call's text tokens and latent size (CallLayout.context, "
                                ".size).")
        text, p = call.context.shape[1], family.joint.patch
        joint = _JointMaps(sessions, grids, ((call.size[0] + p // 2) // p, (call.size[1] + p // 2) // p), text)
    handles = []
    try:
        for path, es in entries.items():
            hook = _layer_hook(path, es, masks, blocks[path], path in finals, grids, family.rows(path), text)
            handles.append(_submodule(unet, path).register_forward_hook(hook))
        for t in targets if sessions else ():  # after the layer hooks: q and k as the model computes them
            if joint is not None:
                handles.append(family.joint.block(unet, t).register_forward_pre_hook(joint.pre_hook(t.block),
                                                                                   with_kwargs=True))
                continue
            handles.append(family.grid(unet, t).register_forward_pre_hook(_grid_hook(t.block, grids), with_kwargs=True))
            for site in family.attention(unet, t):
                q_hook, k_hook = _attention_hooks(t.block, site.heads, sessions, bias)
                handles.append(site.query.register_forward_hook(q_hook))
                handles.append(site.key.register_forward_hook(k_hook))
        yield Attached(_chain(joint and joint.override, bias and bias.override))
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen(module: nn.Module):
    """Freeze `module` for training something attached to it, and let autograd flow through it.

    Every parameter stops requiring grad (no weight-gradient work, no .grad left behind). Weights made
    under torch.inference_mode() (ComfyUI loads checkpoints that way) "cannot be saved for backward":
    each is swapped for a normal tensor over the same storage (no copy, no extra memory). Everything is
    put back as it was when the scope ends. Call outside inference mode.
    """
    swapped, thawed = [], []
    try:
        for mod in module.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    if t.is_inference():
                        alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                            t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
                        store[name] = nn.Parameter(alias, requires_grad=False) if store is mod._parameters else alias
                        swapped.append((store, name, t))
                    elif t.requires_grad:
                        t.requires_grad_(False)
                        thawed.append(t)
        yield
    finally:
        for t in thawed:
            t.requires_grad_(True)
        for store, name, t in reversed(swapped):
            store[name] = t
