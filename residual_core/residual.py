"""The residuals themselves: a low-rank dW = up @ down per target layer, kept apart from the host model."""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ResidualError, check_range
from .targets import Target, family_label, model_family

INITS = ("zero", "random")


def rank_for(dim: int, rank_fraction: float) -> int:
    return max(1, round(rank_fraction * dim))


class LowRankResidual(nn.Module):
    """dW = (alpha / rank) * up @ down for one proj_out; a 1x1 kernel when the layer is a Conv2d."""

    def __init__(self, out_dim: int, in_dim: int, rank: int, conv: bool, alpha: float | None = None):
        super().__init__()
        self.conv = conv
        self.down = nn.Parameter(torch.zeros(rank, in_dim))
        self.up = nn.Parameter(torch.zeros(out_dim, rank))
        self.alpha = float(rank if alpha is None else alpha)
        self._cast: tuple | None = None  # (device, dtype, down, scaled up) for sampling

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset(self, init: str, generator: torch.Generator | None = None) -> None:
        """'zero': LoRA-style, up = 0 so the untrained residual changes nothing.
        'random': both factors random, as in the paper (which gives no scale; LoRA's kaiming bound is used)."""
        if init not in INITS:
            raise ResidualError(f"init must be one of {INITS}, got {init!r}.")
        with torch.no_grad():
            for p in (self.down, self.up) if init == "random" else (self.down,):
                bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform(a=sqrt(5)) on a [out, in] matrix
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
            if init == "zero":
                self.up.zero_()
        self._cast = None

    def _factors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and self.up.requires_grad:  # training: a differentiable cast every call
            return self.down.to(like), self.up.to(like) * self.scale
        if self._cast is None or self._cast[:2] != (like.device, like.dtype):
            down = self.down.detach().to(like)
            up = (self.up.detach().float() * self.scale).to(like)
            self._cast = (like.device, like.dtype, down, up)
        return self._cast[2], self._cast[3]

    def forget_cast(self) -> None:
        self._cast = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """dW x for the layer's input: [B, C, H, W] for a conv proj_out, [B, N, C] for a linear one."""
        down, up = self._factors(x)
        if self.conv:
            return F.conv2d(F.conv2d(x, down[:, :, None, None]), up[:, :, None, None])
        return F.linear(F.linear(x, down), up)

    def weight_delta(self) -> torch.Tensor:
        """dW as a dense matrix (for checks, not for sampling)."""
        return (self.up.detach().float() @ self.down.detach().float()) * self.scale


@dataclass
class ResidualMeta:
    """What a residual file records about the concept and how it was made."""

    class_word: str = ""
    identifier: str = ""
    rank_fraction: float = 0.05
    base_family: str = ""
    base_hash: str = ""
    steps: int = 0
    lr: float = 0.0
    seed: int = 0
    batch_size: int = 0
    init: str = "zero"
    weight_decay: float = 0.01  # AdamW's; files from before it was recorded were all trained with 0.01
    # Each training run's steps and learning rate, oldest first: "150@0.001,100@0.0005" (a residual trained
    # further from a saved one). Empty in files from before it was recorded: one run of `steps` at `lr`.
    lr_history: str = ""

    def runs(self) -> list[tuple[int, float]]:
        """lr_history as (steps, lr) per run; one run of steps at lr when it is empty (older files)."""
        if not self.lr_history:
            return [(self.steps, self.lr)] if self.steps else []
        out = []
        for item in self.lr_history.split(","):
            steps, sep, lr = item.partition("@")
            try:
                if not sep:
                    raise ValueError
                out.append((int(steps), float(lr)))
            except ValueError:
                raise ResidualError(f"lr_history must read like '150@0.001,100@0.0005', got {self.lr_history!r}."
                                    ) from None
        return out

    def add_run(self, steps: int, lr: float) -> None:
        """Record a training run of `steps` at `lr` after those already recorded: steps becomes the total."""
        runs = [*self.runs(), (steps, lr)]
        self.lr_history = ",".join(f"{n}@{rate:g}" for n, rate in runs)
        self.steps, self.lr = sum(n for n, _ in runs), lr

    def as_strings(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_strings(cls, data: dict[str, str]) -> ResidualMeta:
        """Parse and check the metadata of a file; fields it lacks keep their defaults."""
        out = cls()
        for f in fields(cls):
            if f.name in data:
                try:
                    setattr(out, f.name, type(getattr(out, f.name))(data[f.name]))
                except ValueError as e:
                    raise ResidualError(f"metadata field {f.name!r} has a bad value {data[f.name]!r}: {e}") from None
        try:
            check_range("rank_fraction", out.rank_fraction, 0, 1, low_open=True)
            check_range("lr", out.lr, 0, 1)
            check_range("weight_decay", out.weight_decay, 0, 1)
            for name in ("steps", "seed", "batch_size"):
                check_range(name, getattr(out, name), 0, 2**64)
            if out.init not in INITS:
                raise ResidualError(f"init must be one of {INITS}, got {out.init!r}.")
            runs = out.runs()
            for steps, lr in runs:
                check_range("lr_history's steps", steps, 1, 2**64)
                check_range("lr_history's learning rate", lr, 0, 1, low_open=True)
            if out.lr_history and sum(n for n, _ in runs) != out.steps:
                raise ResidualError(f"lr_history {out.lr_history!r} adds up to {sum(n for n, _ in runs)} steps, "
                                    f"not the {out.steps} of steps.")
        except ResidualError as e:
            raise ResidualError(f"The file's metadata is wrong: {e} The file was edited or damaged.") from None
        return out


KINDS = ("residual", "lora")
UNMASKABLE = ("global", "skip")


class ResidualSet(nn.Module):
    """Low-rank deltas on named layers of a model: module path (inside the UNet, e.g.
    "input_blocks.1.1.proj_out") -> LowRankResidual, and what LAG does with them.

    kind "residual": a trained personalized residual, one layer on every target (each block's proj_out),
    with the concept's metadata. kind "lora": a LoRA file's layers, on any Linear or 1x1-conv module.
    With LAG, the layers a spatial mask can apply to (the family says which: Family.mask_block) are masked
    by their block's mask and the others are applied everywhere (unmaskable "global") or left out ("skip"),
    as are the text rows of a layer over [text; image] tokens (Flux's linear2). A residual's default is "skip":
    under LAG it acts on the image only (on SD every residual layer is maskable, so it never matters there).
    Without LAG every layer applies everywhere: the LoRA as a weight merge would give it, up to rounding.
    File names (kohya's) are the file format's business (fileformat.py), not this container's.
    """

    def __init__(self, layers: dict[str, LowRankResidual], meta: ResidualMeta | None = None, kind: str = "residual",
                 unmaskable: str | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ResidualError(f"kind must be one of {KINDS}, got {kind!r}.")
        unmaskable = unmaskable or ("skip" if kind == "residual" else "global")
        if unmaskable not in UNMASKABLE:
            raise ResidualError(f"unmaskable must be one of {UNMASKABLE}, got {unmaskable!r}.")
        self.paths = list(layers)
        self.factors = nn.ModuleList(layers.values())  # registered, for .to(), .parameters(), requires_grad_()
        self.meta, self.kind, self.unmaskable = meta or ResidualMeta(), kind, unmaskable
        self._placements: dict[tuple[int, bool], tuple[weakref.ref, dict]] = {}  # per UNet: worked out once

    @property
    def layers(self) -> dict[str, LowRankResidual]:
        return dict(zip(self.paths, self.factors, strict=True))

    @classmethod
    def for_targets(
        cls,
        targets: list[Target],
        rank_fraction: float = 0.05,
        init: str = "zero",
        seed: int = 0,
        meta: ResidualMeta | None = None,
    ) -> ResidualSet:
        check_range("rank_fraction", rank_fraction, 0, 1, "The paper uses 0.05.", low_open=True)
        generator = torch.Generator().manual_seed(seed)
        layers = {}
        for t in targets:
            layer = LowRankResidual(t.out_dim, t.in_dim, rank_for(t.out_dim, rank_fraction), t.conv)
            layer.reset(init, generator)
            layers[t.name] = layer
        meta = meta or ResidualMeta()
        meta.rank_fraction, meta.init, meta.base_family = rank_fraction, init, model_family(targets)
        return cls(layers, meta)

    def continued(self, targets: list[Target], rank_fraction: float, name: str = "resume_from") -> ResidualSet:
        """A trainable copy of this residual (factors and metadata; this one is left as it is), to train further on
        the model whose targets are `targets` at `rank_fraction`. A ResidualError naming the input `name` when it
        is a LoRA, was made for another model or at another rank."""
        if self.kind != "residual":
            raise ResidualError(f"{name} is a LoRA, not a personalized residual: training continues only from a "
                                "residual this pack trained.")
        try:
            self.check_fits(targets)
        except ResidualError as e:
            raise ResidualError(f"{name}: {e}") from None
        by_path = {t.name: t for t in targets}
        for path, layer in self.layers.items():
            want = rank_for(by_path[path].out_dim, rank_fraction)
            if layer.rank != want:
                raise ResidualError(
                    f"{name} has rank {layer.rank} on {path} (rank_fraction {self.meta.rank_fraction:g}) but "
                    f"rank_fraction {rank_fraction:g} gives rank {want}: set rank_fraction to "
                    f"{self.meta.rank_fraction:g} to continue training it.")
        layers = {}
        with torch.no_grad():
            for path, layer in self.layers.items():
                copy = LowRankResidual(layer.up.shape[0], layer.down.shape[1], layer.rank, layer.conv, layer.alpha)
                copy.down.copy_(layer.down.detach().float())
                copy.up.copy_(layer.up.detach().float())
                layers[path] = copy
        return ResidualSet(layers, ResidualMeta(**asdict(self.meta)), self.kind, self.unmaskable)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_fits(self, targets: list[Target], unet: nn.Module | None = None) -> None:
        """Raise a ResidualError that says what differs when this was made for another model: a residual
        against the model's targets, a LoRA against the model's own layers (`unet`)."""
        if self.kind == "lora":
            return self._check_layers(unet)
        by_path = {t.name: t for t in targets}
        model = family_label(model_family(targets))
        made_for = family_label(self.meta.base_family) if self.meta.base_family else "another model"
        fix = f"Use a residual trained with this model's family ({model}), or train one with this model."
        if set(by_path) != set(self.paths):
            raise ResidualError(
                f"This residual was made for {made_for} ({len(self.paths)} transformer blocks) but the model is "
                f"{model} ({len(targets)} transformer blocks). {fix}"
            )
        for path, layer in self.layers.items():
            t = by_path[path]
            got = (layer.up.shape[0], layer.down.shape[1], layer.conv)
            if got != (t.out_dim, t.in_dim, t.conv):
                raise ResidualError(
                    f"This residual was made for {made_for} but the model is {model}: its layer {path} is "
                    f"{got[0]}x{got[1]} ({'conv' if got[2] else 'linear'}), the model's is {t.out_dim}x{t.in_dim} "
                    f"({'conv' if t.conv else 'linear'}). {fix}"
                )

    def _check_layers(self, unet: nn.Module) -> None:
        for path, layer in self.layers.items():
            try:
                weight = unet.get_submodule(path).weight
            except AttributeError:
                raise ResidualError(f"This LoRA has a layer {path} that the model lacks: it was made for another "
                                    "model. Use a LoRA made for this model's family.") from None
            ours = (layer.up.shape[0], layer.down.shape[1], "1x1 conv" if layer.conv else "linear")
            kind = "linear" if weight.ndim == 2 else "1x1 conv" if weight.shape[2:] == (1, 1) else "conv"
            if ours != (weight.shape[0], weight.shape[1], kind):
                raise ResidualError(f"This LoRA's layer {path} is {ours[0]}x{ours[1]} ({ours[2]}), the model's is "
                                    f"{weight.shape[0]}x{weight.shape[1]} ({kind}): it was made for another model. "
                                    "Use a LoRA made for this model's family.")

    def placement(self, unet: nn.Module, targets: list[Target], lagged: bool, family
                  ) -> dict[str, tuple[LowRankResidual, tuple | None]]:
        """Module path -> (layer, the block whose mask it takes or None for everywhere), as attach() applies it.
        Worked out on the first call for a UNet (a LoRA has hundreds of layers: not on every UNet call)."""
        cached = self._placements.get((id(unet), lagged))
        if cached is not None and cached[0]() is unet:
            return cached[1]
        self.check_fits(targets, unet)
        out = {}
        for path, layer in self.layers.items():
            block = family.mask_block(path, targets)
            if block is None and lagged and self.unmaskable == "skip":
                continue
            out[path] = (layer, block)
        self._placements[(id(unet), lagged)] = (weakref.ref(unet), out)
        return out

    def forget_casts(self) -> None:
        for layer in self.factors:
            layer.forget_cast()


def low_rank(up: torch.Tensor, down: torch.Tensor, alpha: float | None = None, conv: bool | None = None) -> LowRankResidual:
    """A LoRA layer's factors as a LowRankResidual: up [out, r(, 1, 1)], down [r, in(, 1, 1)], scale alpha / r
    (1 without alpha, as ComfyUI reads such files). conv: whether the layer is a 1x1 conv (default: whether
    the factors are 4-D; some tools save 2-D factors for 1x1 convs)."""
    kernels = [t.shape[2:] for t in (up, down) if t.ndim == 4]
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or any(k != (1, 1) for k in kernels) or up.shape[1] != down.shape[0]:
        raise ResidualError(f"Only the factors of linear and 1x1-conv LoRA layers can be masked, got up {list(up.shape)} "
                            f"and down {list(down.shape)}.")
    rank = down.shape[0]
    layer = LowRankResidual(up.shape[0], down.shape[1], rank, down.ndim == 4 if conv is None else conv,
                            alpha=rank if alpha is None else alpha)
    with torch.no_grad():
        layer.up.copy_(up.reshape(up.shape[0], rank))
        layer.down.copy_(down.reshape(rank, down.shape[1]))
    return layer
