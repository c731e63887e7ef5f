"""Personalisation methods compared in the evaluation world, all on the same loss loop (residual_core.fit),
data, steps and seeds; only what they train differs.

- residuals: ours, low-rank residuals on every proj_out (sampled globally or with LAG)
- lora_attn: LoRA on every attention projection (to_q, to_k, to_v, to_out of attn1 and attn2), DreamBooth-LoRA style
- full_ft: the whole UNet (DreamBooth without prior preservation)
- custom_diffusion: the cross-attention key and value projections (attn2.to_k, attn2.to_v)
- textual_inversion: the identifier's token embedding only
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from personalized_residuals.residual_core import (
    CallLayout,
    Concept,
    LagSession,
    LowRankResidual,
    ResidualSet,
    TrainConfig,
    attach,
    fileformat,
    find_targets,
    fit,
    frozen,
    locate_concept,
    train_residual,
)
from safetensors.torch import save_file

from .world.model import WorldModel
from .world.text import IDS, tokenize


@dataclass
class Trained:
    """A personalised model, ready to sample: the (possibly copied) model plus a patch around UNet calls."""

    model: WorldModel
    patch: Callable[[str], Callable[[], object]]  # caption -> the context manager factory for its UNet calls
    parameters: int
    file_bytes: int
    seconds: float
    layers: ResidualSet | None = None  # what attach() applies, for the methods that are hooks

    def sample(self, caption: str, seeds: list[int], **kw) -> torch.Tensor:
        return self.model.sample([caption] * len(seeds), seeds, patch=self.patch(caption), **kw)


def _file_bytes(tensors: dict[str, torch.Tensor]) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
        return os.path.getsize(path)


def _concept_denoiser(model: WorldModel, captions: list[str]):
    """The training denoiser with each photo's caption (one caption: the same prompt for every photo)."""
    return model.denoiser(model.text.encode(captions))


def residuals(model: WorldModel, latents, captions, config: TrainConfig, rank_fraction: float = 0.25,
              on_step=None) -> Trained:
    residual = ResidualSet.for_targets(find_targets(model.unet), rank_fraction, seed=config.seed)
    started = time.perf_counter()
    train_residual(residual, model.unet, _concept_denoiser(model, captions), latents, model.alphas_cumprod,
                   model.prediction, config, on_step=on_step)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as d:
        fileformat.save(residual, os.path.join(d, "r.safetensors"))
        size = os.path.getsize(os.path.join(d, "r.safetensors"))
    return Trained(model, lambda caption: lambda: attach(model.unet, [Concept(residual)]), residual.num_parameters(), size,
                   seconds, residual)


def with_lag(trained: Trained, identifier: str, class_word: str, rule: str, value: float,
             unmaskable: str = "global") -> Trained:
    """The same residual (or LoRA) sampled with LAG: masks from the caption's identifier and class-word
    tokens. For a LoRA, `unmaskable` says what its text-side layers (attn2 to_k/to_v) do: global or skip."""
    model = trained.model
    layers = trained.layers
    if layers.kind == "lora":
        layers = ResidualSet(layers.layers, kind="lora", unmaskable=unmaskable)

    def patch(caption):
        concept = locate_concept(model.tokenize, caption, identifier, class_word)
        session = LagSession(concept.positions, concept.prompt_tokens, rule, value)
        # sample() batches [uncond; cond]
        return lambda: attach(model.unet, [Concept(layers, lag=session)], call=CallLayout([1, 0]))

    return Trained(model, patch, trained.parameters, trained.file_bytes, trained.seconds, layers)


def _adapters_on(modules: dict[str, torch.nn.Linear], rank: int, seed: int) -> dict[str, LowRankResidual]:
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, linear in modules.items():
        a = LowRankResidual(linear.out_features, linear.in_features, rank, conv=False)
        a.reset("zero", g)
        adapters[name] = a
    return adapters


def lora_attn(model: WorldModel, latents, captions, config: TrainConfig, rank: int = 4) -> Trained:
    modules = {n: m for n, m in model.unet.named_modules()
               if any(n.endswith(f"{a}.{p}") for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))}
    lora = ResidualSet(_adapters_on(modules, rank, config.seed), kind="lora")
    params = [p for a in lora.layers.values() for p in a.parameters()]
    for p in params:
        p.requires_grad_(True)
    started = time.perf_counter()
    with frozen(model.unet), attach(model.unet, [Concept(lora)]):
        fit(params, _concept_denoiser(model, captions), latents, model.alphas_cumprod, model.prediction, config)
    seconds = time.perf_counter() - started
    for p in params:
        p.requires_grad_(False)
    lora.forget_casts()
    state = {f"{n}.{k}": v for n, a in lora.layers.items() for k, v in a.state_dict().items()}
    return Trained(model, lambda caption: lambda: attach(model.unet, [Concept(lora)]), sum(p.numel() for p in params),
                   _file_bytes(state), seconds, lora)


def _fine_tune(model: WorldModel, latents, captions, config: TrainConfig, select: Callable[[str], bool]) -> Trained:
    tuned = copy.deepcopy(model)
    params = {n: p for n, p in tuned.unet.named_parameters() if select(n)}
    for p in params.values():
        p.requires_grad_(True)
    started = time.perf_counter()
    fit(list(params.values()), _concept_denoiser(tuned, captions), latents, tuned.alphas_cumprod, tuned.prediction, config)
    seconds = time.perf_counter() - started
    tuned.requires_grad_(False)
    return Trained(tuned, lambda caption: nullcontext, sum(p.numel() for p in params.values()),
                   _file_bytes(params), seconds)


def full_ft(model, latents, captions, config) -> Trained:
    return _fine_tune(model, latents, captions, config, lambda name: True)


def custom_diffusion(model, latents, captions, config) -> Trained:
    return _fine_tune(model, latents, captions, config, lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name)


def textual_inversion(model: WorldModel, latents, captions, config: TrainConfig, identifier: str = "sks",
                      class_word: str = "square") -> Trained:
    """Trains one vector in place of the identifier's embedding, started from the class word's (TI starts
    from a coarse descriptor); the sampling model is a copy whose embedding table holds the result."""
    ids = torch.tensor([tokenize(c)[0] for c in captions], device=model.device)
    vector = model.text.token_embedding.weight[IDS[class_word]].detach().clone().requires_grad_(True)

    def denoiser(x_t, t, index):
        rows = ids[index] if len(ids) > 1 else ids.expand(len(x_t), -1)
        embeddings = torch.where((rows == IDS[identifier])[..., None], vector, model.text.token_embedding(rows))
        return model.unet(x_t, t, model.text(rows, embeddings=embeddings))

    started = time.perf_counter()
    with frozen(model):
        fit([vector], denoiser, latents, model.alphas_cumprod, model.prediction, config)
    seconds = time.perf_counter() - started
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.text.token_embedding.weight[IDS[identifier]] = vector.detach()
    return Trained(tuned, lambda caption: nullcontext, vector.numel(), _file_bytes({"embedding": vector}), seconds)
