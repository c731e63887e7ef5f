"""The world's text-to-image model: an SD1.x-shaped UNet over a lossless space-to-depth "latent", a small
text encoder, v-prediction on SD's discrete schedule rescaled to zero terminal SNR, and a DDIM sampler.

Why v and zero terminal SNR (EVALUATION.md, measured): on SD's own schedule the last noise level still
carries ~7% of the image, and with flat backgrounds an epsilon model read the background colour from the
starting noise instead of the caption; rescaled to zero terminal SNR with v-prediction, as SD2 does, it
followed the caption.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .text import VOCAB, TextEncoder, tokenize
from .unet import SDUNet

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "world_base.safetensors"
UNET_CONFIG = dict(in_channels=12, out_channels=12, model_channels=48, channel_mult=(1, 2), attention_levels=(0, 1),
                   num_res_blocks=1, num_heads=4, transformer_depth=1, context_dim=64, use_linear=False)


def zero_snr_schedule(steps: int = 1000) -> torch.Tensor:
    """SD's scaled-linear betas, rescaled so the last step is pure noise (Lin et al., 2024). -> alphas_cumprod."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root**2).float()


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 32, 32] in [0, 1] -> [B, 12, 16, 16] in [-1, 1] (pixel_unshuffle: lossless)."""
    return F.pixel_unshuffle(images * 2 - 1, 2)


def to_image(latents: torch.Tensor) -> torch.Tensor:
    return (F.pixel_shuffle(latents, 2).clamp(-1, 1) + 1) / 2


class WorldModel(nn.Module):
    prediction = "v"

    def __init__(self, vocab: int = len(VOCAB)):
        super().__init__()
        self.unet = SDUNet(**UNET_CONFIG)
        self.text = TextEncoder(dim=UNET_CONFIG["context_dim"], vocab=vocab)
        self.register_buffer("alphas_cumprod", zero_snr_schedule(), persistent=False)

    @classmethod
    def load(cls, path: Path = WEIGHTS, device: str | torch.device = "cpu") -> WorldModel:
        """The words a model knows are the rows of its embedding table (the first base model: no pattern words)."""
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        model = cls(vocab=state["text.token_embedding.weight"].shape[0])
        model.load_state_dict(state)
        return model.to(device).eval().requires_grad_(False)

    def save(self, path: Path | str = WEIGHTS) -> None:
        """fp16 on disk (the model is trained and run in fp32), to keep the committed file small."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().half().contiguous() for k, v in self.state_dict().items()}, str(path))

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def tokenize(self, text: str) -> list[list[int]]:
        return tokenize(text)

    def denoiser(self, contexts: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """residual_core's Denoiser: (x_t, t, photo index) -> v, with each photo's caption context
        (contexts [photos or 1, tokens, dim])."""
        if len(contexts) == 1:
            return lambda x_t, t, index: self.unet(x_t, t, contexts.expand(len(x_t), -1, -1))
        return lambda x_t, t, index: self.unet(x_t, t, contexts[index])

    @torch.no_grad()
    def sample(
        self,
        captions: list[str],
        seeds: list[int],
        steps: int = 25,
        guidance: float = 4.0,
        patch: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """DDIM (eta 0) with classifier-free guidance; one image per (caption, seed). -> [B, 3, 32, 32].

        patch(): a context manager entered around every UNet call, given the batch as [uncond; cond],
        e.g. a residual attached with residual_core.attach(..., call=CallLayout([1, 0])).
        """
        device = self.device
        cond = self.text.encode(captions)
        uncond = self.text.encode([""]).expand_as(cond)
        context = torch.cat([uncond, cond])
        x = torch.stack([torch.randn(12, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
        ab = self.alphas_cumprod
        ts = torch.linspace(len(ab) - 1, 0, steps + 1).round().long().tolist()  # trailing: starts at pure noise
        for t, t_prev in zip(ts[:-1], ts[1:], strict=True):
            tt = torch.full((2 * len(x),), t, device=device)
            with patch() if patch else nullcontext():
                v_uncond, v_cond = self.unet(torch.cat([x, x]), tt, context).chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
            a, a_prev = ab[t], ab[t_prev]
            x0 = a.sqrt() * x - (1 - a).sqrt() * v
            eps = (1 - a).sqrt() * x + a.sqrt() * v
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return to_image(x)


@dataclass(frozen=True)
class WorldRun:
    """What each of the world's benchmarks starts from: its output folder, the shipped base model, and when it
    started (loading included)."""

    out: Path
    model: WorldModel
    started: float

    @property
    def minutes(self) -> float:
        return (time.time() - self.started) / 60


def start_run(out: str | Path) -> WorldRun:
    """The output folder made, torch's global seed set (0), the base model loaded."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.time()
    return WorldRun(out, WorldModel.load(), started)
