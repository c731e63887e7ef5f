import hashlib

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_unet
from personalized_residuals.residual_core import (
    ResidualError,
    ResidualSet,
    TrainConfig,
    attach,
    find_targets,
    train_residual,
)
from personalized_residuals.residual_core.errors import TrainingDiverged
from personalized_residuals.residual_core.train import CHECK_EVERY

ALPHAS = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)  # SD's scaled-linear schedule


def _setup(use_linear=False, inference=False):
    torch.manual_seed(0)
    with torch.inference_mode(inference):
        unet = tiny_unet(use_linear)
    ctx = torch.randn(1, 6, 16)
    latents = torch.randn(2, 4, 8, 8)
    residual = ResidualSet.for_targets(find_targets(unet), 0.5)
    return unet, residual, latents, (lambda x_t, t, index: unet(x_t, t, ctx.expand(len(x_t), -1, -1))), ctx


def _checksum(module):
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode() + t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fixed_batch_loss(unet, residual, latents, ctx):
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (16,), generator=g)
    x0 = latents[torch.arange(16) % len(latents)]
    eps = torch.randn(x0.shape, generator=g)
    a = ALPHAS[t].view(-1, 1, 1, 1)
    with torch.no_grad(), attach(unet, residual):
        return F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, ctx.expand(16, -1, -1)), eps).item()


@pytest.mark.parametrize("use_linear", [False, True])
def test_training_lowers_the_loss_and_touches_nothing_but_the_residual(use_linear):
    unet, residual, latents, denoiser, ctx = _setup(use_linear)
    before_sum, before_loss = _checksum(unet), _fixed_batch_loss(unet, residual, latents, ctx)
    losses = train_residual(residual, unet, denoiser, latents, ALPHAS, "eps", TrainConfig(steps=60, lr=1e-2))
    assert losses.shape == (60,) and torch.isfinite(losses).all()
    assert _fixed_batch_loss(unet, residual, latents, ctx) < 0.9 * before_loss
    assert _checksum(unet) == before_sum
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.requires_grad for p in unet.parameters()), "requires_grad is restored"
    assert not any(p.requires_grad for p in residual.parameters())
    assert any(layer.up.abs().sum() > 0 for layer in residual.layers.values())


def test_same_seed_same_residual_bit_for_bit_and_another_seed_differs():
    runs = []
    for seed in (7, 7, 8):
        unet, residual, latents, denoiser, _ = _setup()
        train_residual(residual, unet, denoiser, latents, ALPHAS, config=TrainConfig(steps=5, seed=seed, flip=True))
        runs.append(torch.cat([p.flatten() for p in residual.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_weights_made_in_inference_mode_train_and_are_put_back():
    unet, residual, latents, denoiser, _ = _setup(inference=True)
    params = list(unet.parameters())
    assert all(p.is_inference() for p in params)
    train_residual(residual, unet, denoiser, latents, ALPHAS, config=TrainConfig(steps=3))
    assert all(a is b for a, b in zip(params, unet.parameters(), strict=True))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_loss_target_follows_the_prediction_type(prediction):
    unet, residual, latents, _, ctx = _setup()
    x0 = latents[:1].expand(2, -1, -1, -1)

    def oracle(x_t, t, index):  # knows x0, so it returns the exact eps or v
        a = ALPHAS[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0[: len(x_t)]) / (1 - a).sqrt()
        out = eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0[: len(x_t)]
        return out + 0 * unet(x_t, t, ctx.expand(len(x_t), -1, -1))

    losses = train_residual(residual, unet, oracle, latents[:1], ALPHAS, prediction,
                            TrainConfig(steps=2, batch_size=2))
    assert losses.max() < 1e-6


def test_bad_prediction_or_latents_are_refused():
    unet, residual, latents, denoiser, _ = _setup()
    with pytest.raises(ResidualError, match="prediction"):
        train_residual(residual, unet, denoiser, latents, ALPHAS, "x0")
    with pytest.raises(ResidualError, match="latents"):
        train_residual(residual, unet, denoiser, latents[0], ALPHAS)


def _poisoned(denoiser, at_step, value, calls):
    """The denoiser, returning `value` everywhere from step `at_step` (0-based) on."""

    def run(x_t, t, index):
        calls.append(1)
        out = denoiser(x_t, t, index)
        return out * value if len(calls) > at_step else out

    return run


@pytest.mark.parametrize("at_step,value", [(0, float("nan")), (13, float("inf")), (25, float("nan"))])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_residual(at_step, value):
    config = TrainConfig(steps=40, lr=1e-2, seed=3)
    unet, residual, latents, denoiser, _ = _setup()
    before = _checksum(unet)
    snapshots = {0: [p.detach().clone() for p in residual.parameters()]}

    def keep(step, losses):  # the state after step + 1 updates, from a clean run of the same config
        snapshots[step + 1] = [p.detach().clone() for p in residual.parameters()]

    train_residual(residual, unet, denoiser, latents, ALPHAS, config=config, on_step=keep)

    unet, residual, latents, denoiser, _ = _setup()
    calls = []
    with pytest.raises(TrainingDiverged, match=f"loss became {value} at step {at_step + 1}. The residual is put back "
                                               f"to its state after step {max(at_step - 1, 0)}.*Lower the learning rate") as e:
        train_residual(residual, unet, _poisoned(denoiser, at_step, value, calls), latents, ALPHAS, config=config)
    assert e.value.step == at_step + 1 and e.value.kept_step == max(at_step - 1, 0)
    kept = snapshots[max(at_step - 1, 0)]
    assert all(torch.equal(p, k) for p, k in zip(residual.parameters(), kept, strict=True)), "bit-identical"
    assert len(calls) == (at_step // CHECK_EVERY + 1) * CHECK_EVERY, "stops at the first check after the NaN"
    assert _checksum(unet) == before and not any(m._forward_hooks for m in unet.modules())
    assert not any(p.requires_grad for p in residual.parameters())


def test_an_update_that_blows_up_on_the_last_step_is_caught_too(monkeypatch):
    unet, residual, latents, denoiser, _ = _setup()
    config = TrainConfig(steps=3)
    step = torch.optim.AdamW.step
    count = []

    def last_step_explodes(self, *args, **kwargs):
        count.append(1)
        out = step(self, *args, **kwargs)
        if len(count) == config.steps:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", last_step_explodes)
    with pytest.raises(TrainingDiverged, match="the update of step 3 made the residual non-finite.*state after step 2"):
        train_residual(residual, unet, denoiser, latents, ALPHAS, config=config)
    assert all(torch.isfinite(p).all() for p in residual.parameters())


@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", 10**6), ("batch_size", 0), ("batch_size", 65),
                                         ("lr", 0.0), ("lr", 2.0), ("lr", float("nan")), ("lr", float("inf"))])
def test_settings_out_of_range_or_not_finite_are_refused(field, value):
    unet, residual, latents, denoiser, _ = _setup()
    name = "learning rate" if field == "lr" else field
    with pytest.raises(ResidualError, match=f"{name} must be in .*got {value!r}"):
        train_residual(residual, unet, denoiser, latents, ALPHAS, config=TrainConfig(**{field: value}))


@pytest.mark.parametrize("use_linear", [False, True])
def test_gradient_checkpointing_trains_the_same_residual_and_is_undone(use_linear):
    results = []
    for checkpointing in (False, True):
        unet, residual, latents, denoiser, _ = _setup(use_linear)
        config = TrainConfig(steps=4, lr=1e-2, gradient_checkpointing=checkpointing)
        train_residual(residual, unet, denoiser, latents, ALPHAS, "eps", config)
        results.append(torch.cat([p.flatten() for p in residual.parameters()]))
        assert not any("forward" in vars(m) for m in unet.modules()), "block forwards are restored"
    assert results[0].abs().max() > 0 and torch.allclose(results[0], results[1], atol=1e-6)
