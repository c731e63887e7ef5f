"""What LAG on Flux will read from ComfyUI, pinned on ComfyUI's own Flux class (small, random weights): the
attention override ComfyUI calls (transformer_options["optimized_attention_override"]) sees q and k of every
double and single block after RoPE, text tokens first; an override set by another node still runs when ours
wraps it; and the joint-attention map (residual_core/joint_attention.py) reads those q and k."""

import pytest
import torch
from comfy_env import SKIPPED

pytestmark = pytest.mark.skipif(SKIPPED is not None, reason=str(SKIPPED))

TEXT, LATENT = 5, (8, 12)  # 5 T5 tokens; an 8x12 latent: 4x6 = 24 image tokens of 2x2 patches


@pytest.fixture(scope="module")
def flux():
    from comfyui_models import build_flux

    return build_flux()


def call(flux, x, context, overrides):
    """The diffusion model's forward, as ComfyUI's model call makes it, with `overrides` chained in the
    order given (each wraps the ones before it, as a node chaining onto an existing override would)."""
    override = None
    for make in overrides:
        override = make(override)
    options = {"optimized_attention_override": override} if override else {}
    with torch.inference_mode():
        return flux.model.diffusion_model(x, torch.tensor([0.5]), context, y=torch.zeros(1, 32),
                                          guidance=torch.tensor([3.5]), transformer_options=options)


def observer(seen):
    """An override that records q and k, then hands the call on: to the override it wraps, or ComfyUI's kernel."""
    def make(previous):
        def override(func, q, k, v, heads, *args, **kwargs):
            seen.append((q.clone(), k.clone()))
            if previous is not None:
                return previous(func, q, k, v, heads, *args, **kwargs)
            return func(q, k, v, heads, *args, **kwargs)
        return override
    return make


def test_the_override_sees_every_blocks_q_and_k_text_first_and_changes_nothing(flux):
    torch.manual_seed(0)
    x, context = torch.randn(1, 16, *LATENT), torch.randn(1, TEXT, 32)
    plain = call(flux, x, context, [])
    seen = []
    watched = call(flux, x, context, [observer(seen)])
    assert torch.equal(plain, watched)
    diffusion = flux.model.diffusion_model
    assert len(seen) == len(diffusion.double_blocks) + len(diffusion.single_blocks)
    image = (LATENT[0] // 2) * (LATENT[1] // 2)
    assert all(q.shape == k.shape == (1, 4, TEXT + image, 16) for q, k in seen)
    # Text first: in the first double block the text stream has not met the image yet, so a new latent
    # changes only the last `image` rows of q and k.
    again = []
    call(flux, torch.randn(1, 16, *LATENT), context, [observer(again)])
    (q0, k0), (q1, k1) = seen[0], again[0]
    assert torch.equal(q0[:, :, :TEXT], q1[:, :, :TEXT]) and torch.equal(k0[:, :, :TEXT], k1[:, :, :TEXT])
    assert not torch.equal(q0[:, :, TEXT:], q1[:, :, TEXT:])


def test_another_nodes_override_still_runs_inside_ours(flux):
    torch.manual_seed(1)
    x, context = torch.randn(1, 16, *LATENT), torch.randn(1, TEXT, 32)

    def halves(previous):  # another node's override: it changes the attention's output
        def override(func, *args, **kwargs):
            return func(*args, **kwargs) * 0.5
        return override

    theirs = call(flux, x, context, [halves])
    seen = []
    both = call(flux, x, context, [halves, observer(seen)])
    assert torch.equal(theirs, both) and not torch.equal(theirs, call(flux, x, context, []))
    assert len(seen) == 4


def test_the_map_reads_the_concepts_columns_from_the_overrides_q_and_k(flux):
    from personalized_residuals.residual_core.joint_attention import patch_grid, text_attention

    torch.manual_seed(2)
    context = torch.randn(1, TEXT, 32)
    seen = []
    call(flux, torch.randn(1, 16, *LATENT), context, [observer(seen)])
    maps = [text_attention(q, k, TEXT, torch.tensor([1, 2])) for q, k in seen]
    everything = [text_attention(q, k, TEXT, torch.arange(TEXT)) for q, k in seen]
    assert all(m.shape == (1, 24) and ((m > 0) & (m < 1)).all() for m in maps)
    assert all(torch.allclose(e, torch.ones(1, 24)) for e in everything)
    assert patch_grid(maps[0], *LATENT).shape == (1, *LATENT)


def test_a_model_of_neither_family_and_companions_of_the_other_family_are_refused_by_name(flux, sd15, clip, vae):
    """Every node takes SD and Flux models; another model (SD3: FLOW prediction) is refused by its class and
    prediction type, and an SD residual, CLIP or VAE with a Flux model (and the reverse) naming both sides."""
    from types import SimpleNamespace

    from comfy.model_base import ModelType
    from comfy_env import concept_residual, run, train
    from comfyui_models import build_flux_clip, build_vae
    from personalized_residuals.nodes.comfy_model import family_of
    from personalized_residuals.nodes.lag import LagSampler
    from personalized_residuals.residual_core import ResidualError

    sd3_like = SimpleNamespace(model=type("SD3", (), {"model_type": ModelType.FLOW})())
    with pytest.raises(ResidualError, match=r"This model is SD3 \(FLOW prediction\): the pack supports SD1.x, SD2.x "
                                            r"and SDXL, Flux.1 or Chroma checkpoints"):
        family_of(sd3_like)
    import comfy.model_base  # Chroma Radiance subclasses Chroma, which subclasses Flux, but works in pixel space
    with pytest.raises(ResidualError, match=r"This model is ChromaRadiance .*the pack supports"):
        family_of(SimpleNamespace(model=object.__new__(comfy.model_base.ChromaRadiance)))
    flux_clip, photos = build_flux_clip(), [torch.rand(1, 64, 64, 3)]
    lag = {"mode": "LAG", "strength": 1.0, "mask_rule": "max_fraction", "mask_value": 0.5, "start_percent": 0.0,
           "end_percent": 1.0}
    refusals = {
        "an SD residual on Flux": (lambda: run(LagSampler, flux, concept_residual(sd15), flux_clip,
                                               "a photo of a sks dog", **lag),
                                   "made for a custom UNet.*the model is a custom Flux"),
        "a Flux residual on SD": (lambda: run(LagSampler, sd15, concept_residual(flux), clip, "a photo of a sks dog",
                                              **lag), "made for a custom Flux.*the model is a custom UNet"),
        "an SD CLIP with Flux": (lambda: run(LagSampler, flux, concept_residual(flux), clip, "a photo of a sks dog",
                                             **lag),
                                 r"clip is an SD text encoder \(no T5-XXL\) but the model is Flux.1.*DualCLIPLoader"),
        "a Flux CLIP with SD": (lambda: train(sd15, flux_clip, vae, photos),
                                r"clip is a T5-XXL text encoder \(Flux's, Chroma's\) but the model is SD1.x, SD2.x and SDXL"),
        "an SD VAE with Flux": (lambda: train(flux, flux_clip, vae, photos),
                                "vae makes 4-channel latents but the model \\(Flux.1\\) takes 16"),
        "a Flux VAE with SD": (lambda: train(sd15, clip, build_vae(16), photos), "vae makes 16-channel latents"),
    }
    for case, (make, message) in refusals.items():
        with pytest.raises(ResidualError, match=message):
            make()
        print(f"{case}: refused")
