"""Samples while training: each sample prompt rendered by the base model and by the residual at some of the training
steps (its factors kept then, rendered after training), LAG Sampler's way, at one fixed seed, as one labelled grid."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import torch

from ..residual_core import FLUX, ResidualError, ResidualSet, locate_concept
from .comfy_model import encode_prompt, family_of, tokenizer_of
from .lag import LagConcept, with_concept
from .pictures import sample_grid

SAMPLE_SIZE = 256  # pixels, or the training resolution when smaller
CFG, SAMPLER, SCHEDULER = 7.0, "euler", "normal"
MAX_SAMPLE_COLUMNS = 16  # residual snapshots kept during training (each a copy of the residual on the device)


def sample_prompts(text: str, identifier: str, class_word: str) -> list[str]:
    """One prompt per non-empty line; none: the training prompt."""
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    return prompts or [f"a photo of a {identifier} {class_word}"]


def prompt_warnings(prompts: list[str], clip, identifier: str, class_word: str) -> list[str]:
    """A warning for each sample prompt that lacks the identifier or the class word (it is rendered with the
    residual applied everywhere, as LAG Sampler's global mode does)."""
    out = []
    for prompt in prompts:
        try:
            locate_concept(tokenizer_of(clip), prompt, identifier, class_word)
        except ResidualError:
            out.append(f"the sample prompt '{prompt}' lacks '{identifier} {class_word}': LAG can't find the concept in "
                       "it, so it is rendered with the residual applied everywhere (global).")
    return out


class Snapshots:
    """The residual's factors at chosen steps (on the device, a copy each): a few MB for SD1.5's residual."""

    def __init__(self, every: int, steps: int):
        self.every, self.steps = every, steps
        self.kept: list[tuple[int, list[torch.Tensor]]] = []

    def after_step(self, step: int, residual: ResidualSet) -> None:
        done = step + 1
        if self.every and done % self.every == 0 and done < self.steps:
            self.kept.append((done, [p.detach().clone() for p in residual.parameters()]))


def render(model, clip, vae, residual: ResidualSet, targets, prompts: list[str], snapshots: list[tuple[int, list]],
           done: int, size: int, steps: int, seed: int) -> torch.Tensor:
    """The grid as an IMAGE [1, H, W, 3]: a row per prompt; columns base, the residual at each snapshot's step and at
    step `done` (its factors now). The residual is left with its factors as they are now."""
    meta = residual.meta
    cfg = 1.0 if family_of(model) is FLUX else CFG  # Flux.1 is guidance-distilled: no CFG
    negative = None if cfg == 1.0 else encode_prompt(clip, "")  # cfg 1 never evaluates a negative
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    final = [p.detach().clone() for p in residual.parameters()]
    columns = [*(s for s in snapshots if s[0] < done), (done, final)]  # a Cancel may stop right at a snapshot
    rows = []
    try:
        for prompt in prompts:
            try:
                locate_concept(tokenizer_of(clip), prompt, meta.identifier, meta.class_word)
                rule = ("max_fraction", 0.5)  # LAG Sampler's defaults
            except ResidualError:
                rule = None  # global, as warned
            positive = encode_prompt(clip, prompt)  # with_concept's below find it made
            against = positive if negative is None else negative
            row = [_sample(model, vae, positive, against, latent, steps, cfg, seed)]
            for _, factors in columns:
                with torch.inference_mode(False), torch.no_grad():
                    for p, f in zip(residual.parameters(), factors, strict=True):
                        p.copy_(f)
                residual.forget_casts()
                concept = LagConcept(residual, meta.identifier, meta.class_word, 1.0, rule, None)
                patched, positive_lag = with_concept(model, concept, clip, prompt, targets)
                row.append(_sample(patched, vae, positive_lag, against, latent, steps, cfg, seed))
            rows.append(row)
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p, f in zip(residual.parameters(), final, strict=True):
                p.copy_(f)
        residual.forget_casts()
    labels = ["base", *(f"step {n}" for n, _ in columns)]
    return sample_grid(rows, prompts, labels)


def _sample(model, vae, positive, negative, latent, steps, cfg, seed) -> torch.Tensor:
    """KSampler's sampling (common_ksampler) without its progress bar, which would restart the training node's bar
    for every sample; Cancel is still checked at every step."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, SAMPLER, SCHEDULER, positive, negative, latent_image,
                              callback=_check_cancel, disable_pbar=True, seed=seed)
    return vae.decode(out)[0].float().cpu().clamp(0, 1)  # [H, W, 3]


def _check_cancel(step, x0, x, total_steps):
    comfy.model_management.throw_exception_if_processing_interrupted()
