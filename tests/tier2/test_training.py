"""Training inside ComfyUI: it learns, it is reproducible, Cancel stops it cleanly, every family trains."""

import comfy.model_management
import comfy.utils
import pytest
import torch
from comfy_env import train, weights_hash
from personalized_residuals.nodes.comfy_model import targets_of
from personalized_residuals.residual_core import ResidualSet, attach
from personalized_residuals.residual_core.images import square_batch

IMAGES = [torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))]


def _train(model, clip, vae, **overrides):
    return train(model, clip, vae, IMAGES, **overrides)[0]


def _eps_loss_on_a_fixed_batch(model, clip, vae, residual):
    """Epsilon MSE of the training prompt on fixed noise and timesteps, through ComfyUI's model call."""
    base = model.model
    with torch.inference_mode():
        x0 = base.process_latent_in(vae.encode(square_batch(IMAGES, 64))).repeat(4, 1, 1, 1)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a sks dog"))[0][0]
    g = torch.Generator().manual_seed(1)
    sigma = base.model_sampling.sigmas[torch.randint(0, 1000, (len(x0),), generator=g)]
    eps = torch.randn(x0.shape, generator=g)
    x = x0 + eps * sigma.view(-1, 1, 1, 1)
    with torch.no_grad(), attach(base.diffusion_model, residual):
        denoised = base.apply_model(x, sigma, c_crossattn=cond.expand(len(x0), -1, -1))
    return float((((x - denoised) / sigma.view(-1, 1, 1, 1) - eps) ** 2).mean())


def test_training_lowers_the_loss_on_a_fixed_batch(sd15, clip, vae):
    residual = _train(sd15, clip, vae, steps=40, learning_rate=1e-2)
    untrained = ResidualSet.for_targets(targets_of(sd15), 0.25)  # zero init: the base model
    before = _eps_loss_on_a_fixed_batch(sd15, clip, vae, untrained)
    after = _eps_loss_on_a_fixed_batch(sd15, clip, vae, residual)
    print(f"fixed-batch eps loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)


def test_same_seed_gives_a_bit_identical_residual_and_the_model_is_untouched(sd15, clip, vae):
    before = weights_hash(sd15)
    runs = [_train(sd15, clip, vae, seed=s, flip=True) for s in (3, 3, 4)]
    flat = [torch.cat([p.flatten() for p in r.parameters()]) for r in runs]
    assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2])
    assert weights_hash(sd15) == before


def test_cancel_stops_within_a_step_and_leaves_the_model_as_it_was(sd15, clip, vae, monkeypatch):
    before = weights_hash(sd15)
    params = list(sd15.model.parameters())
    steps = []
    update = comfy.utils.ProgressBar.update

    def press_cancel_after_two_steps(self, value):
        update(self, value)
        steps.append(self.current)
        if self.current == 2:
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update", press_cancel_after_two_steps)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _train(sd15, clip, vae, steps=50)
    assert steps == [1, 2]
    assert not comfy.model_management.processing_interrupted()
    assert all(a is b for a, b in zip(params, sd15.model.parameters(), strict=True)), "original tensors back in place"
    assert not any(m._forward_hooks for m in sd15.model.modules()), "no hook left behind"
    assert weights_hash(sd15) == before


@pytest.mark.parametrize("family,clip_fixture,layers", [("sd2_v", "clip_sd2", 16), ("sdxl", "clip_sdxl", 11)])
def test_v_prediction_and_sdxl_train(family, clip_fixture, layers, request, vae):
    model, clip = request.getfixturevalue(family), request.getfixturevalue(clip_fixture)
    residual = _train(model, clip, vae, steps=3)
    assert len(residual.layers) == layers
    assert all(not layer.conv for layer in residual.layers.values())
    assert any(layer.up.abs().sum() > 0 for layer in residual.layers.values())
