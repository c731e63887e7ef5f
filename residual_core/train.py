"""The training loop: only the residuals learn; the UNet, text encoder and VAE stay frozen.

The loss is the standard diffusion MSE at uniformly drawn discrete timesteps, on epsilon or on v
(SD2.x-v), or on the rectified flow's velocity (Flux: x_t = (1 - s) x0 + s eps, target eps - x0, s drawn
from the model's own sigma schedule), matching how the base model was trained. Latents and the text
conditioning are fixed for the run (the caller encodes them once). Every random draw comes from one
generator seeded by the seed: the image order, flips and timesteps up front (a few numbers per step), the
noise one step at a time (see _step_noise), the same numbers as one up-front draw would give.

With subject masks (one per photo) the loss counts only the subject: each photo's squared error is averaged
over its mask (taken to the latent's resolution and dilated by MASK_DILATION), so the loss is on the same
scale whatever the subject's size, and a mask of ones gives the unmasked loss.

A model that computes in float16 needs loss scaling (LossScaler): the gradients reaching the residual are
mostly below float16's normal range. The residual and its optimiser stay float32 whatever the model runs in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import checkpointed
from .errors import ResidualError, TrainingDiverged, check_range
from .family import SD_UNET, Family
from .hooks import Concept, attach, frozen
from .residual import ResidualSet
from .targets import Target

# denoiser(x_t, t, index) -> the model's raw output (eps or v) for noisy latents x_t at integer timesteps t;
# index says which photo each row is (for per-photo captions; a single concept prompt ignores it).
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTIONS = ("eps", "v", "flow")


@dataclass
class TrainConfig:
    """Defaults from the paper: 150 steps, batch 4, lr 1e-3 (AdamW, constant).

    weight_decay is AdamW's decoupled weight decay: each step shrinks the residual's factors by lr x
    weight_decay (1e-5 of their value at the defaults, so about 0.15% over 150 steps). 0.01 is torch's AdamW
    default, which this pack always used; it is written into the residual file's metadata.
    """

    steps: int = 150
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    flip: bool = False  # use the horizontally flipped copies half of the time
    gradient_checkpointing: bool = False  # less activation memory, about one more forward pass per step
    weight_decay: float = 0.01

    def check(self) -> None:
        check_range("steps", self.steps, 1, 100_000, "The paper uses 150.")
        check_range("batch_size", self.batch_size, 1, 64, "The paper uses 4.")
        check_range("learning rate", self.lr, 0, 1, "The paper uses 1e-3.", low_open=True)
        check_range("weight_decay", self.weight_decay, 0, 1, "The default is 0.01 (torch's AdamW default).")


# A family's native training resolution in pixels: what its base model was trained at. SD2.x's epsilon
# model (SD2 "base") is 512, its v model 768.
NATIVE_RESOLUTION = {"sd1": 512, "sd2-eps": 512, "sd2-v": 768, "sdxl": 1024, "flux": 1024}
DEFAULT_RESOLUTION = 512  # a UNet of no known family


def native_resolution(family: str, prediction: str) -> int | None:
    """The native resolution of a model family (see targets.model_family); None for an unknown one."""
    key = f"sd2-{prediction}" if family == "sd2" else family
    return NATIVE_RESOLUTION.get(key)


# Subject masks are dilated by this many latent pixels (8 image pixels each for SD's VAE) on every side: a
# latent pixel at the subject's outline also encodes what lies next to it (the VAE's receptive field reaches
# past its own 8x8 pixels), and segmentation masks tend to cut hair, fur and thin parts a little short, so the
# outline itself is learned rather than left free to halo. One pixel is 1.6% of a 512-px photo's width.
MASK_DILATION = 1


def latent_masks(masks: torch.Tensor, size: tuple[int, int], dilation: int = MASK_DILATION) -> torch.Tensor:
    """Subject masks [N, H, W] in 0-1 -> [N, 1, h, w] at the latent size (h, w): each latent pixel gets the
    share of its pixels that is subject (area average), then the largest value within `dilation` latent pixels
    (max filter), so the subject and a thin band around it weigh 1."""
    m = F.interpolate(masks[:, None].float(), size=size, mode="area")
    if dilation:
        m = F.max_pool2d(m, 2 * dilation + 1, stride=1, padding=dilation)
    return m


def masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The diffusion MSE. With a mask [B, 1, h, w]: each row's squared error averaged over its mask (weights
    0-1), then over the rows: the loss scale does not depend on the subject's size, and each photo counts as
    much as in the unmasked loss. A mask of ones gives F.mse_loss (up to rounding); pixels where it is 0 give no loss
    and no gradient."""
    if mask is None:
        return F.mse_loss(out, target)
    se = (out - target).pow(2).mean(1, keepdim=True)
    return ((se * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3))).mean()


def _check_masks(masks: torch.Tensor, latents: torch.Tensor) -> None:
    n, h, w = latents.shape[0], *latents.shape[-2:]
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ResidualError(f"masks must be [N, H, W] with one mask per latent (N = {n}), got shape "
                            f"{tuple(masks.shape)}.")
    if masks.shape[1] * w != masks.shape[2] * h:
        raise ResidualError(f"masks are {masks.shape[2]}x{masks.shape[1]} but the latents {w}x{h}: the same aspect "
                            "is needed (square_masks crops the masks as square_batch crops the photos).")
    if not bool(torch.isfinite(masks).all()) or float(masks.min()) < 0 or float(masks.max()) > 1:
        raise ResidualError("masks must hold values in 0-1 (1 marks the subject).")
    empty = [i + 1 for i in range(n) if not bool(masks[i].any())]
    if empty:
        raise ResidualError(f"masks: the mask of photo(s) {', '.join(map(str, empty))} is all 0: no subject to learn.")


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


class LossScaler:
    """Dynamic loss scaling, for a model that computes in float16 (GPUs without bf16: T4, V100, RTX 20xx).

    The gradient of the mean-squared loss is 2 (out - target) / N per element, N = batch x latent size
    (65,536 at SD's 512 px, batch 4), and it only shrinks on its way back to the residual: most of it is below
    float16's smallest normal number (6.1e-5), where it loses precision or flushes to zero. The loss is
    multiplied by `scale` (a power of two, so exact) before the backward pass and the float32 gradients
    divided by it after. A step whose gradients overflowed (inf or NaN) is skipped, the residual and the
    optimiser untouched, and the scale halved; after `growth_interval` good steps in a row it doubles.

    A skipped step is not divergence: the loss the TrainingDiverged guard watches is the unscaled one. Only
    gradients that overflow even unscaled (scale 1) stop training, with TrainingDiverged.
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 100):
        self.scale = float(scale)
        self.growth_interval = growth_interval
        self.skipped = 0  # steps whose update was skipped
        self._good = 0  # good steps in a row
        self._overflowed_unscaled = False

    def unscale(self, parameters: list[torch.Tensor]) -> bool:
        """Divide the gradients by the scale; False, and the scale halved, if they overflowed. Reads one flag
        from the device per step: the step must be taken or skipped before the next one."""
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        self._overflowed_unscaled = not finite and self.scale <= 1
        if not finite:
            self.skipped += 1
            self.scale /= 2
            self._good = 0
            return False
        for g in grads:
            g.mul_(1 / self.scale)
        self._good += 1
        if self._good == self.growth_interval:
            self.scale *= 2
            self._good = 0
        return True

    def stop_if_unscaled(self, step: int) -> None:
        """After a skipped step (0-based `step`): raise if its gradients overflowed with no scaling left."""
        if self._overflowed_unscaled:
            raise TrainingDiverged(
                f"Training stopped: the gradients overflowed float16 at step {step + 1} even without loss scaling. The "
                f"residual is as it was after step {step}. Train in float32 or bfloat16 (start ComfyUI with "
                "--force-fp32 or --bf16-unet) or lower the learning rate.", step + 1, step)


@dataclass
class _Draws:
    index: torch.Tensor  # [steps, batch] image index
    flip: torch.Tensor  # [steps, batch] bool
    t: torch.Tensor  # [steps, batch] timestep
    noise: Iterator[torch.Tensor]  # [batch, *latent] per step, drawn when asked for


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
        noise=_step_noise(g, config.steps, (config.batch_size, *latent_shape)),
    )


_BLOCK = 16  # torch's CPU randn turns 16 uniforms at a time into normals (Box-Muller over 8 pairs)


def _step_noise(g: torch.Generator, steps: int, shape: tuple) -> Iterator[torch.Tensor]:
    """Each step's noise, bit-identical to torch.randn(steps, *shape, generator=g) but one step in memory
    (that single draw is 42 GB for the node's 10,000 steps at batch 64, 512 px).

    torch's CPU randn of n >= 16 numbers draws n uniforms, maps each aligned block of 16 to normals, and, when
    16 does not divide n, draws 16 more uniforms for the last 16 numbers. So whole blocks are drawn as a step
    needs them, and a ragged end is finished as randn does it (tier 1 compares with the single draw)."""
    n = math.prod(shape)
    total = steps * n
    if n < _BLOCK:  # a tail could reach back into earlier steps; tiny anyway
        yield from torch.randn(steps, *shape, generator=g)
        return
    whole = total - total % _BLOCK  # the numbers that come from whole blocks
    ready, done = torch.empty(0), 0  # drawn but not yet handed out; how many were drawn
    for step in range(steps):
        need = min((step + 1) * n, whole) - done
        if need > 0:
            count = -(-need // _BLOCK) * _BLOCK
            ready = torch.cat([ready, torch.randn(count, generator=g)])
            done += count
        if (step + 1) * n <= whole:
            out, ready = ready[:n], ready[n:]
        else:  # the last step of a ragged draw: randn's extra uniforms, then its redrawn last 16
            torch.rand(total - whole, generator=g)
            out = torch.cat([ready, torch.empty(total - whole)])
            out[-_BLOCK:] = torch.randn(_BLOCK, generator=g)
        yield out.view(shape)


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
    scaler: LossScaler | None = None,
    masks: torch.Tensor | None = None,
    attention_loss=None,
) -> torch.Tensor:
    """The diffusion-loss loop over `parameters` (tensors that require grad), whatever they belong to.

    latents: [N, C, H, W], already scaled as the model expects. alphas_cumprod: per discrete timestep, the
    schedule's alphas_cumprod for eps and v, its sigmas for flow. flipped_latents: the same images
    flipped, used when config.flip. on_step(step, losses) runs after each step with the loss history
    so far on the device (a place to report progress or raise to cancel). Returns the per-step losses.
    A NaN or inf loss raises TrainingDiverged within CHECK_EVERY steps, with `parameters` put back to their
    last state that gave a finite loss. autocast_dtype: run the denoiser under autocast to it. scaler: loss
    scaling, for a denoiser that computes in float16 (a step whose gradients overflow is skipped).
    masks: subject masks [N, H, W] in 0-1, one per latent, at the latents' aspect (any resolution, e.g. the
    photos'): the loss counts only the subject (see latent_masks, masked_mse); a flipped photo's mask is flipped.
    denoiser's index: the photo of each row (a flipped row too), e.g. to pick its caption (PhotoPrompts).
    attention_loss: an attention_loss.AttentionLoss (needs masks), added to each step's loss; None: off.
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
    if masks is not None:
        _check_masks(masks, latents)
        masks = latent_masks(masks.to(device), tuple(latents.shape[-2:]))
        flipped_masks = masks.flip(-1) if config.flip else None  # once, as the flipped latents
    draws = _draw(config, latents.shape[0], alphas_cumprod.shape[0], tuple(latents.shape[1:]))
    t = draws.t.to(device)
    ab = alphas_cumprod.to(device, torch.float32)[t].view(*t.shape, 1, 1, 1)
    index = draws.index.to(device)
    flip = draws.flip.to(device).view(*t.shape, 1, 1, 1) if config.flip else None

    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    losses = torch.zeros(config.steps, device=device)
    last_good = _LastGood(parameters)
    for step, eps in zip(range(config.steps), draws.noise, strict=True):
        x0 = latents[index[step]]
        mask = None if masks is None else masks[index[step]]
        if flip is not None:
            x0 = torch.where(flip[step], flipped_latents[index[step]], x0)
            mask = None if mask is None else torch.where(flip[step], flipped_masks[index[step]], mask)
        a, eps = ab[step], eps.to(device)
        if prediction == "flow":  # `a` is the step's sigma
            x_t, target = (1 - a) * x0 + a * eps, eps - x0
        else:
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            target = eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
        recording = attention_loss.recording() if attention_loss is not None else nullcontext()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None), recording:
            out = denoiser(x_t, t[step], index[step])
        loss = masked_mse(out.float(), target.float(), mask)
        if attention_loss is not None:
            loss = loss + attention_loss(mask)
        losses[step] = loss.detach()
        (loss * scaler.scale if scaler is not None else loss).backward()
        last_good.update(loss.detach(), step)
        if scaler is not None and not scaler.unscale(parameters):
            last_good.check(losses[: step + 1], config.lr)  # a NaN or inf loss overflows them too: divergence
            scaler.stop_if_unscaled(step)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % CHECK_EVERY == 0:
            last_good.check(losses[: step + 1], config.lr)
        if on_step is not None:
            on_step(step, losses[: step + 1])
    # The last update is checked on the parameters themselves (no later loss sees them).
    last_good.ok &= torch.stack([torch.isfinite(p).all() for p in parameters]).all()
    last_good.check(losses, config.lr)
    return losses.cpu()


@contextmanager
def _copied_inputs(modules: list[nn.Module]):
    """Within the scope, each module gets a copy of its input, so an in-place add to that input after the call
    leaves the tensor the module saved for backward as it was."""
    handles = [m.register_forward_pre_hook(lambda module, args: (args[0].clone(), *args[1:])) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
    scaler: LossScaler | None = None,
    masks: torch.Tensor | None = None,
    attention_loss=None,
    family: Family = SD_UNET,
) -> torch.Tensor:
    """Train `residual`, attached to `unet`'s residual layers (`family`'s targets), with everything else frozen (see fit; masks:
    one subject mask per photo, for a loss on the subject only; attention_loss: see fit)."""
    config = config or TrainConfig()
    residual.to(latents.device).float().requires_grad_(True)
    recompute = checkpointed(unet) if config.gradient_checkpointing else nullcontext()
    try:
        with frozen(unet), attach(unet, [Concept(residual)], family=family, targets=targets), recompute, \
                _copied_inputs(family.changed_in_place(unet)):
            return fit(list(residual.parameters()), denoiser, latents, alphas_cumprod, prediction, config,
                       flipped_latents, on_step, autocast_dtype, scaler, masks=masks, attention_loss=attention_loss)
    finally:
        residual.requires_grad_(False)
        residual.forget_casts()
