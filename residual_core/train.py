"""The training loop: only the residuals learn; the UNet, text encoder and VAE stay frozen.

The loss is the standard diffusion MSE at uniformly drawn discrete timesteps, on epsilon or on v
(SD2.x-v), matching how the base model was trained. Latents and the text conditioning are fixed for
the run (the caller encodes them once); every random draw of the run is made up front from the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import checkpointed
from .errors import ResidualError, TrainingDiverged, check_range
from .hooks import attach, frozen
from .residual import ResidualSet
from .targets import Target

# denoiser(x_t, t, index) -> the model's raw output (eps or v) for noisy latents x_t at integer timesteps t;
# index says which photo each row is (for per-photo captions; a single concept prompt ignores it).
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTIONS = ("eps", "v")


@dataclass
class TrainConfig:
    """Defaults from the paper: 150 steps, batch 4, lr 1e-3 (AdamW, constant)."""

    steps: int = 150
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    flip: bool = False  # use the horizontally flipped copies half of the time
    gradient_checkpointing: bool = False  # less activation memory, about one more forward pass per step

    def check(self) -> None:
        check_range("steps", self.steps, 1, 100_000, "The paper uses 150.")
        check_range("batch_size", self.batch_size, 1, 64, "The paper uses 4.")
        check_range("learning rate", self.lr, 0, 1, "The paper uses 1e-3.", low_open=True)


# The host reads the divergence flag every this many steps (one sync each), to stop soon after a NaN.
CHECK_EVERY = 10


class _LastGood:
    """The residual's last state whose loss was finite, kept on the device: a copy per step and a device
    flag, so nothing waits on the GPU; the host reads the flag only every CHECK_EVERY steps."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.kept = [p.detach().clone() for p in params]
        self.ok = torch.ones((), dtype=torch.bool, device=params[0].device)
        self.kept_step = torch.zeros((), dtype=torch.long, device=params[0].device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Call before the optimiser step: the parameters now are those that produced `loss`."""
        self.ok &= torch.isfinite(loss)
        for kept, p in zip(self.kept, self.params, strict=True):
            kept.copy_(torch.where(self.ok, p.detach(), kept))
        self.kept_step.copy_(torch.where(self.ok, step, self.kept_step))

    def check(self, losses: torch.Tensor, lr: float) -> None:
        """Host check (syncs): if a loss was not finite, restore the kept state and raise."""
        if bool(self.ok):
            return
        with torch.no_grad():
            for kept, p in zip(self.kept, self.params, strict=True):
                p.copy_(kept)
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        step = bad[0] + 1 if bad else len(losses)
        what = (f"the loss became {float(losses[bad[0]])} at step {step}" if bad else
                f"the update of step {step} made the residual non-finite")
        kept_step = int(self.kept_step)
        raise TrainingDiverged(
            f"Training stopped: {what}. The residual is put back to its state after step {kept_step}, which still "
            f"gave a finite loss. Lower the learning rate (now {lr:g}), or train in float32 if the model runs in "
            "float16.", step, kept_step,
        )


@dataclass
class _Draws:
    index: torch.Tensor  # [steps, batch] image index
    flip: torch.Tensor  # [steps, batch] bool
    t: torch.Tensor  # [steps, batch] timestep
    noise: torch.Tensor  # [steps, batch, *latent]


def _draw(config: TrainConfig, n_images: int, n_timesteps: int, latent_shape: tuple) -> _Draws:
    g = torch.Generator().manual_seed(config.seed)
    total = config.steps * config.batch_size
    # Cycle through shuffled images so each is seen equally often.
    perms = torch.cat([torch.randperm(n_images, generator=g) for _ in range(-(-total // n_images))])
    shape = (config.steps, config.batch_size)
    return _Draws(
        index=perms[:total].view(shape),
        flip=torch.rand(shape, generator=g) < 0.5,
        t=torch.randint(0, n_timesteps, shape, generator=g),
        noise=torch.randn(*shape, *latent_shape, generator=g),
    )


def fit(
    parameters: list[torch.Tensor],
    denoiser: Denoiser,
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str = "eps",
    config: TrainConfig | None = None,
    flipped_latents: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The diffusion-loss loop over `parameters` (tensors that require grad), whatever they belong to.

    latents: [N, C, H, W], already scaled as the model expects. flipped_latents: the same images
    flipped, used when config.flip. on_step(step, losses) runs after each step with the loss history
    so far on the device (a place to report progress or raise to cancel). Returns the per-step losses.
    A NaN or inf loss raises TrainingDiverged within CHECK_EVERY steps, with `parameters` put back to their
    last state that gave a finite loss.
    """
    config = config or TrainConfig()
    config.check()
    if prediction not in PREDICTIONS:
        raise ResidualError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise ResidualError(f"latents must be [N, C, H, W] with N >= 1, got shape {tuple(latents.shape)}.")
    if config.flip and flipped_latents is None:
        flipped_latents = latents.flip(-1)
    device = latents.device
    draws = _draw(config, latents.shape[0], alphas_cumprod.shape[0], tuple(latents.shape[1:]))
    t = draws.t.to(device)
    ab = alphas_cumprod.to(device, torch.float32)[t].view(*t.shape, 1, 1, 1)
    index, noise = draws.index.to(device), draws.noise.to(device)
    flip = draws.flip.to(device).view(*t.shape, 1, 1, 1) if config.flip else None

    optimizer = torch.optim.AdamW(parameters, lr=config.lr)
    losses = torch.zeros(config.steps, device=device)
    last_good = _LastGood(parameters)
    for step in range(config.steps):
        x0 = latents[index[step]]
        if flip is not None:
            x0 = torch.where(flip[step], flipped_latents[index[step]], x0)
        a, eps = ab[step], noise[step]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = denoiser(x_t, t[step], index[step])
        loss = F.mse_loss(out.float(), target.float())
        loss.backward()
        last_good.update(loss.detach(), step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
        if (step + 1) % CHECK_EVERY == 0:
            last_good.check(losses[: step + 1], config.lr)
        if on_step is not None:
            on_step(step, losses[: step + 1])
    # The last update is checked on the parameters themselves (no later loss sees them).
    last_good.ok &= torch.stack([torch.isfinite(p).all() for p in parameters]).all()
    last_good.check(losses, config.lr)
    return losses.cpu()


def train_residual(
    residual: ResidualSet,
    unet: nn.Module,
    denoiser: Denoiser,
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str = "eps",
    config: TrainConfig | None = None,
    flipped_latents: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    targets: list[Target] | None = None,
) -> torch.Tensor:
    """Train `residual`, attached to `unet`'s proj_out layers, with everything else frozen (see fit)."""
    config = config or TrainConfig()
    residual.to(latents.device).float().requires_grad_(True)
    recompute = checkpointed(unet) if config.gradient_checkpointing else nullcontext()
    try:
        with frozen(unet), attach(unet, residual, targets=targets), recompute:
            return fit(list(residual.parameters()), denoiser, latents, alphas_cumprod, prediction, config,
                       flipped_latents, on_step, autocast_dtype)
    finally:
        residual.requires_grad_(False)
        residual.forget_casts()
