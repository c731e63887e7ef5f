"""Tier 2's access to the real ComfyUI, imported in-process (see comfyui_models.py), and helpers shared
by the tier-2 tests. Without ComfyUI every tier-2 test is skipped, and the run says so loudly."""

from __future__ import annotations

from dataclasses import dataclass, field

from comfyui_models import (  # noqa: F401  (re-exported for the tests)
    COMFY,
    SDXL_POOLED,
    SDXLTextStandIn,
    bootstrap,
    build_clip,
    build_sd2_v,
    build_sd15,
    build_sdxl,
    build_vae,
)

SKIPPED = bootstrap()


def run(node, *args, **kwargs):
    """Execute a V3 node as ComfyUI's executor does: under torch.inference_mode(), returning its outputs."""
    import torch

    with torch.inference_mode():
        return node.execute(*args, **kwargs).result


def counted_encodes(clip, monkeypatch):
    """A clone of `clip` that nothing encoded with yet, and the list its text-encoder runs are counted in."""
    clip = clip.clone()
    encode, calls = clip.encode_from_tokens_scheduled, []
    monkeypatch.setattr(clip, "encode_from_tokens_scheduled", lambda tokens, **kw: calls.append(1) or encode(tokens, **kw))
    return clip, calls


def weights_hash(model) -> str:
    """sha256 over every tensor of a ModelPatcher's model, names included: equal means bit-identical."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in model.model.state_dict().items():
        h.update(name.encode() + t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ksample(model, positive, negative, cfg=4.0, steps=3, size=8, batch=1, seed=0, channels=4):
    """The stock KSampler's sampling (common_ksampler) on an empty latent, under inference mode as ComfyUI runs it."""
    import torch

    import nodes as comfy_nodes

    latent = {"samples": torch.zeros(batch, channels, size, size)}  # Flux: 16 channels
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def stock_lora(model, residual, folder, name="r.safetensors"):
    """The residual saved to `folder` and applied by ComfyUI's own LoRA loading (weights merged)."""
    import comfy.sd
    import comfy.utils
    from personalized_residuals.residual_core import fileformat

    path = folder / name
    fileformat.save(residual, str(path))
    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0)[0]


def train(model, clip, vae, images, **overrides):
    """Train Personalized Residual as ComfyUI runs it (every input a list), with small, quick defaults."""
    from personalized_residuals.nodes.train import TrainPersonalizedResidual

    args = {"class_word": "dog", "identifier": "sks", "steps": 4, "learning_rate": 1e-3, "batch_size": 2,
            "rank_fraction": 0.25, "seed": 0, "resolution": 64, "flip": False, "init": "zero",
            "sample_steps": 0, **overrides}  # no samples unless a test asks: they cost more than these 4 steps
    return run(TrainPersonalizedResidual, model=[model], clip=[clip], vae=[vae], images=images,
               **{k: [v] for k, v in args.items()})


def concept_residual(model, seed=0):
    """A residual with random factors for `model`, made for the concept 'sks dog'."""
    from personalized_residuals.nodes.comfy_model import targets_of
    from personalized_residuals.residual_core import ResidualSet

    residual = ResidualSet.for_targets(targets_of(model), 0.25, "random", seed)
    residual.meta.class_word, residual.meta.identifier = "dog", "sks"
    return residual


@dataclass(frozen=True)
class AppliedMask:
    session: object  # the concept's LagSession
    evaluation: int  # the model evaluation (sampler step) of the run it was applied in, as the session counts them
    mask: object  # [rows, positions]


@dataclass
class SamplingSpy:
    """What a sampling run did, recorded by spy_sampling: one entry per model evaluation (calc_cond_batch call),
    and every mask LAG applied, per block and UNet call, the chain's concepts in order."""

    evaluations: list = field(default_factory=list)
    applied: list[AppliedMask] = field(default_factory=list)

    def pairs(self) -> list[tuple[AppliedMask, AppliedMask]]:
        """Two concepts' masks side by side, per block and call: (the first concept's, the second's)."""
        return list(zip(self.applied[::2], self.applied[1::2], strict=True))


def spy_sampling(monkeypatch) -> SamplingSpy:
    import comfy.samplers
    from personalized_residuals.residual_core import lag

    spy = SamplingSpy()
    original, record = comfy.samplers.calc_cond_batch, lag.LagSession.applied

    def evaluate(*a, **kw):
        spy.evaluations.append(1)
        return original(*a, **kw)

    def applied(self, block, grid, mask, score):
        spy.applied.append(AppliedMask(self, self.strategy.now, mask.clone()))
        return record(self, block, grid, mask, score)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", evaluate)
    monkeypatch.setattr(lag.LagSession, "applied", applied)
    return spy
