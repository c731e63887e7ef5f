"""The residuals themselves: a low-rank dW = up @ down per target layer, kept apart from the host model."""

from __future__ import annotations

import math
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
            for name in ("steps", "seed", "batch_size"):
                check_range(name, getattr(out, name), 0, 2**64)
            if out.init not in INITS:
                raise ResidualError(f"init must be one of {INITS}, got {out.init!r}.")
        except ResidualError as e:
            raise ResidualError(f"The file's metadata is wrong: {e} The file was edited or damaged.") from None
        return out


class ResidualSet(nn.Module):
    """One LowRankResidual per target, keyed by kohya layer name, plus the concept's metadata."""

    def __init__(self, layers: dict[str, LowRankResidual], meta: ResidualMeta | None = None):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.meta = meta or ResidualMeta()

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
            layers[t.key] = layer
        meta = meta or ResidualMeta()
        meta.rank_fraction, meta.init, meta.base_family = rank_fraction, init, model_family(targets)
        return cls(layers, meta)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_fits(self, targets: list[Target]) -> None:
        """Raise a ResidualError that says what differs when this residual was made for another UNet."""
        by_key = {t.key: t for t in targets}
        model = family_label(model_family(targets))
        made_for = family_label(self.meta.base_family) if self.meta.base_family else "another model"
        fix = f"Use a residual trained with this model's family ({model}), or train one with this model."
        if set(by_key) != set(self.layers):
            raise ResidualError(
                f"This residual was made for {made_for} ({len(self.layers)} transformer blocks) but the model is "
                f"{model} ({len(targets)} transformer blocks). {fix}"
            )
        for key, layer in self.layers.items():
            t = by_key[key]
            got = (layer.up.shape[0], layer.down.shape[1], layer.conv)
            if got != (t.out_dim, t.in_dim, t.conv):
                raise ResidualError(
                    f"This residual was made for {made_for} but the model is {model}: its layer {key} is "
                    f"{got[0]}x{got[1]} ({'conv' if got[2] else 'linear'}), the model's is {t.out_dim}x{t.in_dim} "
                    f"({'conv' if t.conv else 'linear'}). {fix}"
                )

    def placement(self, unet: nn.Module, targets: list[Target], lagged: bool) -> dict[str, tuple[LowRankResidual, tuple]]:
        """Module path -> (layer, the block whose LAG mask it takes), as attach() applies it (see LoraLayers)."""
        self.check_fits(targets)
        return {t.name: (self.layers[t.key], t.block) for t in targets}

    def forget_casts(self) -> None:
        for layer in self.layers.values():
            layer.forget_cast()
