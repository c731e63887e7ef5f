"""Training inside ComfyUI: it learns, it is reproducible, Cancel stops it cleanly, every family trains, the
resolution defaults to the family's native one, and attention kernels with no backward pass fall back."""

import logging

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.utils
import pytest
import torch
from comfy_env import ksample, run, train, weights_hash
from personalized_residuals.nodes import train as train_node
from personalized_residuals.nodes.comfy_model import targets_of
from personalized_residuals.nodes.lag import LagSampler
from personalized_residuals.residual_core import Concept, ResidualError, ResidualSet, attach
from personalized_residuals.residual_core.images import square_batch

import nodes as comfy_nodes

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
    with torch.no_grad(), attach(base.diffusion_model, [Concept(residual)]):
        denoised = base.apply_model(x, sigma, c_crossattn=cond.expand(len(x0), -1, -1))
    return float((((x - denoised) / sigma.view(-1, 1, 1, 1) - eps) ** 2).mean())


def test_training_lowers_the_loss_on_a_fixed_batch(sd15, clip, vae):
    residual = _train(sd15, clip, vae, steps=40, learning_rate=1e-2)
    untrained = ResidualSet.for_targets(targets_of(sd15), 0.25)  # zero init: the base model
    before = _eps_loss_on_a_fixed_batch(sd15, clip, vae, untrained)
    after = _eps_loss_on_a_fixed_batch(sd15, clip, vae, residual)
    print(f"fixed-batch eps loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)
    assert residual.meta.weight_decay == 0.01, "the optimiser's weight decay is recorded in the file's metadata"


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


class _Stop(Exception):
    pass


@pytest.mark.parametrize("family,model_fixture,clip_fixture,native", [
    ("sd1", "sd15", "clip", 512), ("sd2", "sd15", "clip", 512), ("sd2", "sd2_v", "clip_sd2", 768),
    ("sdxl", "sdxl", "clip_sdxl", 1024), (None, "sd15", "clip", 512)])
def test_resolution_0_is_the_family_native_one(family, model_fixture, clip_fixture, native, request, vae, monkeypatch,
                                               caplog):
    """The test models are narrower than the real ones (a family of their own): the family is set by hand; the
    prediction (eps, or v for SD2.x-v) is the model's own."""
    model, clip = request.getfixturevalue(model_fixture), request.getfixturevalue(clip_fixture)
    if family is not None:
        monkeypatch.setattr(train_node, "model_family", lambda targets: family)
    seen = []

    def stop_at_the_photos(images, resolution):
        seen.append(resolution)
        raise _Stop

    monkeypatch.setattr(train_node, "square_batch", stop_at_the_photos)
    caplog.set_level(logging.INFO)
    with pytest.raises(_Stop):
        _train(model, clip, vae, resolution=0)
    assert seen == [native]
    assert ("no known family" in caplog.text) == (family is None)
    with pytest.raises(_Stop):
        _train(model, clip, vae, resolution=320)
    assert seen == [native, 320], "a resolution set by hand is kept"


# ---------------------------------------------------------------- attention kernels with no backward pass

@torch.library.custom_op("personalized_residuals_test::flash", mutates_args=())
def _flash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _heads(q, k, v, heads):
    b, _, width = q.shape
    return [t.view(b, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v)]


@comfy_attention.wrap_attn
def attention_sage(q, k, v, heads, mask=None, **kwargs):
    """Stands in for ComfyUI's SageAttention, which can't be installed here: its kernel builds no autograd graph."""
    _calls.append("sage")
    with torch.no_grad():
        out = torch.nn.functional.scaled_dot_product_attention(*_heads(q, k, v, heads))
    return out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[2])


@comfy_attention.wrap_attn
def attention_flash(q, k, v, heads, mask=None, **kwargs):
    """Stands in for ComfyUI's FlashAttention: a custom op with no autograd formula (raises in backward)."""
    _calls.append("flash")
    return _flash_kernel(*_heads(q, k, v, heads)).transpose(1, 2).reshape(q.shape[0], -1, q.shape[2])


_calls = []
_FAKES = {"sage": attention_sage, "flash": attention_flash, "pytorch": comfy_attention.attention_pytorch}


def _use_kernel(monkeypatch, name):
    """ComfyUI started with that kernel: optimized_attention is picked at import from the flags."""
    monkeypatch.setattr(comfy_attention, "optimized_attention", _FAKES[name])
    monkeypatch.setattr(comfy_attention, "optimized_attention_masked", _FAKES[name])


def _flat(residual):
    return torch.cat([p.flatten() for p in residual.parameters()])


@pytest.fixture(scope="module")
def trained_with_pytorch_attention(sd15, clip, vae):
    with pytest.MonkeyPatch.context() as m:
        _use_kernel(m, "pytorch")
        return _flat(_train(sd15, clip, vae))


@pytest.mark.parametrize("kernel,label", [("sage", "SageAttention"), ("flash", "FlashAttention")])
def test_a_kernel_without_backward_is_swapped_for_the_training_pass_only(kernel, label, sd15, clip, vae, monkeypatch,
                                                                         caplog, trained_with_pytorch_attention):
    _use_kernel(monkeypatch, kernel)
    caplog.set_level(logging.INFO)
    _calls.clear()
    residual = _train(sd15, clip, vae)
    assert torch.equal(_flat(residual), trained_with_pytorch_attention), "trained through PyTorch attention"
    assert f"attention is {label}, which has no backward pass" in caplog.text
    assert _calls == []
    model, positive = run(LagSampler, sd15, residual, clip, "a photo of a sks dog", strength=1.0, mode="LAG",
                          mask_rule="max_fraction", mask_value=0.5, start_percent=0.0, end_percent=1.0)
    ksample(model, positive, comfy_nodes.CLIPTextEncode().encode(clip, "")[0])
    assert _calls and set(_calls) == {kernel}, "sampling keeps the fast kernel"


def test_without_the_fallback_those_kernels_break_training(sd15, clip, vae, monkeypatch, trained_with_pytorch_attention):
    """What the fallback prevents, shown on the stand-ins: gradients silently lost (sage), a crash (flash)."""
    monkeypatch.setattr(train_node, "training_attention", lambda options: options)
    _use_kernel(monkeypatch, "sage")
    lost = _flat(_train(sd15, clip, vae))
    off = float((lost - trained_with_pytorch_attention).norm() / trained_with_pytorch_attention.norm())
    print(f"residual trained with no gradient through attention: {off:.3f} off")
    assert off > 1e-3
    _use_kernel(monkeypatch, "flash")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        _train(sd15, clip, vae)


def test_an_override_set_by_another_node_is_chained_and_a_gradient_less_one_is_an_error(sd15, clip, vae, monkeypatch,
                                                                                        trained_with_pytorch_attention):
    _use_kernel(monkeypatch, "sage")
    seen = []

    def passes_through(kernel, *args, **kwargs):  # another node's override, e.g. one that logs or picks kernels
        seen.append(getattr(kernel, "__wrapped__", kernel).__name__)
        return kernel(*args, **kwargs)

    model = sd15.clone()
    model.model_options["transformer_options"]["optimized_attention_override"] = passes_through
    residual = _train(model, clip, vae)
    assert seen and set(seen) == {"attention_pytorch"}, "it ran, handed the kernel with a backward pass"
    assert torch.equal(_flat(residual), trained_with_pytorch_attention)

    def forces_sage(kernel, *args, **kwargs):
        return attention_sage(*args, **kwargs)

    model.model_options["transformer_options"]["optimized_attention_override"] = forces_sage
    with pytest.raises(ResidualError, match="attention kernel in use returned none"):
        _train(model, clip, vae)
