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


def test_training_and_lag_lora_refuse_flux_by_name_and_lag_sampler_an_sd_residual(flux, sd15, clip, vae, loras_dir):
    from comfy_env import concept_residual, run, train
    from personalized_residuals.nodes.lag import LagSampler
    from personalized_residuals.nodes.lora import LagLora
    from personalized_residuals.residual_core import ResidualError, fileformat

    fileformat.save(concept_residual(sd15), str(loras_dir / "sd.safetensors"))
    photos = [torch.rand(1, 64, 64, 3)]
    refusals = {
        "train": lambda: train(flux, clip, vae, photos),
        "LAG LoRA": lambda: run(LagLora, model=flux, clip=clip, lora_name="sd.safetensors", trigger_word="sks",
                                class_word="dog", prompt="a photo of a sks dog", strength=1.0,
                                unmaskable_layers="apply globally", mask_rule="max_fraction", mask_value=0.5,
                                start_percent=0.0, end_percent=1.0),
    }
    for node, make in refusals.items():
        with pytest.raises(ResidualError, match=r"This model is Flux \(FLUX prediction\).*SD1.x, SD2.x and SDXL "
                                                r"checkpoints \(on Flux: LAG Sampler"):
            make()
        print(f"{node}: refused")
    with pytest.raises(ResidualError, match="made for a custom UNet.*the model is a custom Flux"):
        run(LagSampler, flux, concept_residual(sd15), clip, "a photo of a sks dog", mode="LAG", strength=1.0,
            mask_rule="max_fraction", mask_value=0.5, start_percent=0.0, end_percent=1.0)
