import hashlib

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_unet
from personalized_residuals.residual_core import (
    Concept,
    ResidualError,
    ResidualSet,
    TrainConfig,
    attach,
    find_targets,
    frozen,
    train_residual,
)
from personalized_residuals.residual_core.errors import TrainingDiverged
from personalized_residuals.residual_core.residual import ResidualMeta
from personalized_residuals.residual_core.train import CHECK_EVERY, LossScaler, _draw, native_resolution

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
    with torch.no_grad(), attach(unet, [Concept(residual)]):
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


@pytest.mark.parametrize("sign", [1, -1])
def test_the_flow_target_is_eps_minus_x0_at_the_schedules_sigmas(sign):
    """Rectified flow (Flux): x_t = (1 - s) x0 + s eps with s the schedule's sigma at t; the target is eps - x0,
    so an oracle that returns it has no loss, and one that returns x0 - eps has."""
    unet, residual, latents, _, ctx = _setup()
    x0 = latents[:1].expand(2, -1, -1, -1)
    sigmas = torch.linspace(0.05, 1.0, len(ALPHAS))

    def oracle(x_t, t, index):
        s = sigmas[t].view(-1, 1, 1, 1)
        eps = (x_t - (1 - s) * x0[: len(x_t)]) / s
        return sign * (eps - x0[: len(x_t)]) + 0 * unet(x_t, t, ctx.expand(len(x_t), -1, -1))

    losses = train_residual(residual, unet, oracle, latents[:1], sigmas, "flow", TrainConfig(steps=2, batch_size=2))
    assert (losses.max() < 1e-6) if sign == 1 else (losses.min() > 0.1)


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
                                         ("lr", 0.0), ("lr", 2.0), ("lr", float("nan")), ("lr", float("inf")),
                                         ("weight_decay", -0.1), ("weight_decay", 2.0)])
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


# ---------------------------------------------------------------- the random draws

def _up_front_draw(config, n_images, n_timesteps, latent_shape):
    """The draws as they were made before noise was drawn per step: everything up front."""
    g = torch.Generator().manual_seed(config.seed)
    total = config.steps * config.batch_size
    perms = torch.cat([torch.randperm(n_images, generator=g) for _ in range(-(-total // n_images))])
    shape = (config.steps, config.batch_size)
    return (perms[:total].view(shape), torch.rand(shape, generator=g) < 0.5, torch.randint(0, n_timesteps, shape, generator=g),
            torch.randn(*shape, *latent_shape, generator=g))


@pytest.mark.parametrize("steps,batch,latent", [(150, 4, (4, 64, 64)), (150, 4, (12, 16, 16)), (5, 1, (4, 9, 9)),
                                                (4, 3, (4, 7, 10)), (1, 1, (4, 9, 9)), (7, 1, (1, 2, 2)), (3, 2, (1, 3, 3))])
def test_noise_drawn_per_step_is_the_up_front_draw_bit_for_bit(steps, batch, latent):
    """Same seed, same residual as before: per-step noise gives the very numbers of the old single draw,
    whether or not 16 divides the step's or the run's size (torch's CPU randn works in blocks of 16)."""
    config = TrainConfig(steps=steps, batch_size=batch, seed=11)
    draws = _draw(config, 3, 1000, latent)
    index, flip, t, noise = _up_front_draw(config, 3, 1000, latent)
    assert torch.equal(draws.index, index) and torch.equal(draws.flip, flip) and torch.equal(draws.t, t)
    per_step = list(draws.noise)
    assert len(per_step) == steps and all(n.shape == (batch, *latent) for n in per_step)
    assert torch.equal(torch.stack(per_step), noise)


# ---------------------------------------------------------------- weight decay and the native resolution

def test_weight_decay_is_explicit_reaches_adamw_and_is_recorded_in_files(monkeypatch):
    seen = []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen.append(kwargs["weight_decay"])
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    for config in (TrainConfig(steps=1), TrainConfig(steps=1, weight_decay=0.0)):
        unet, residual, latents, denoiser, _ = _setup()
        train_residual(residual, unet, denoiser, latents, ALPHAS, config=config)
    assert seen == [0.01, 0.0]
    assert ResidualMeta.from_strings({}).weight_decay == 0.01, "files from before it was recorded used 0.01"
    assert ResidualMeta.from_strings(ResidualMeta(weight_decay=0.0).as_strings()).weight_decay == 0.0
    with pytest.raises(ResidualError, match="metadata is wrong: weight_decay"):
        ResidualMeta.from_strings({"weight_decay": "5"})


def test_the_learning_rate_history_records_each_run_and_is_checked_when_read():
    meta = ResidualMeta()
    meta.add_run(150, 1e-3)
    meta.add_run(100, 5e-4)
    assert (meta.steps, meta.lr, meta.lr_history) == (250, 5e-4, "150@0.001,100@0.0005")
    assert ResidualMeta.from_strings(meta.as_strings()) == meta
    old = ResidualMeta.from_strings({"steps": "150", "lr": "0.001"})  # a file from before lr_history
    assert old.lr_history == "" and old.runs() == [(150, 1e-3)]
    old.add_run(50, 1e-4)
    assert (old.steps, old.lr_history) == (200, "150@0.001,50@0.0001")
    for bad, why in [("150@0.001,100", "must read like"), ("150@2", "learning rate"), ("0@0.001", "steps"),
                     ("100@0.001", "adds up to 100 steps, not the 150")]:
        with pytest.raises(ResidualError, match=f"metadata is wrong: .*{why}"):
            ResidualMeta.from_strings({"steps": "150", "lr": "0.001", "lr_history": bad})


def test_native_resolution_by_family_and_prediction():
    assert [native_resolution(f, p) for f, p in [("sd1", "eps"), ("sd2", "eps"), ("sd2", "v"), ("sdxl", "eps")]] == \
        [512, 512, 768, 1024]
    assert native_resolution("custom-16x32-64-128-conv", "eps") is None


# ---------------------------------------------------------------- float16 and loss scaling

F16_TINY = torch.finfo(torch.float16).tiny  # 6.1e-5, float16's smallest normal number


def _gradients(dtype, scale):
    """The residual's gradients, and those arriving at its layers' outputs, for one batch at float16-sized
    risk: the loss is weighted to the per-element size of SD's (a mean over 65,536 = 4 x 4 x 64 x 64 numbers,
    512 px at batch 4), since this UNet's batch has 512."""
    unet, residual, latents, _, ctx = _setup()
    unet.to(dtype)
    residual = ResidualSet.for_targets(find_targets(unet), 0.5, "random", 0)
    residual.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (len(latents),), generator=g)
    a = ALPHAS[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * eps
    arriving = []

    def keep(module, args, out):
        out.register_hook(lambda grad: arriving.append(grad.detach().flatten().float()))

    with frozen(unet), attach(unet, [Concept(residual)]):
        handles = [unet.get_submodule(t.name).register_forward_hook(keep) for t in find_targets(unet)]
        out = unet(x_t.to(dtype), t, ctx.to(dtype).expand(len(x_t), -1, -1)).float()
        loss = F.mse_loss(out, eps) * (eps.numel() / 65536)
        (loss * scale).backward()
        for h in handles:
            h.remove()
    return torch.cat([p.grad.flatten() / scale for p in residual.parameters()]), torch.cat(arriving).abs()


def test_float16_gradients_underflow_without_loss_scaling_and_match_float32_with_it():
    reference, _ = _gradients(torch.float32, 1.0)
    plain, arriving_plain = _gradients(torch.float16, 1.0)
    scale = LossScaler().scale
    scaled, arriving_scaled = _gradients(torch.float16, scale)
    below = lambda arriving: float((arriving < F16_TINY).float().mean())
    error = lambda grads: float((grads - reference).norm() / reference.norm())
    zeros = lambda grads: float(((grads == 0) & (reference != 0)).float().mean())
    print(f"at the residual layers' outputs, below float16's normal range: {below(arriving_plain):.5f} unscaled, "
          f"{below(arriving_scaled):.5f} scaled; zero: {float((arriving_plain == 0).float().mean()):.4f} unscaled; "
          f"residual gradients vs float32: relative error {error(plain):.4f} unscaled, {error(scaled):.4f} scaled; "
          f"zeroed {zeros(plain):.4f} unscaled, {zeros(scaled):.4f} scaled")
    # Measured: 0.9999 of the arriving gradients are subnormal or zero unscaled (0.45% zero), none scaled;
    # the residual's gradients are 4.0% off float32 unscaled (0.26% of them zero), 0.48% scaled (the rounding
    # of float16's forward pass).
    assert below(arriving_plain) > 0.9 and error(plain) > 0.02
    assert below(arriving_scaled) < 0.01 and error(scaled) < 0.01 and zeros(scaled) == 0


def _train_float16(scaler, use_linear=False):
    unet, residual, latents, _, ctx = _setup(use_linear)
    unet.half()
    denoiser = lambda x_t, t, index: unet(x_t.half(), t, ctx.half().expand(len(x_t), -1, -1)).float()
    train_residual(residual, unet, denoiser, latents, ALPHAS, "eps", TrainConfig(steps=8, lr=1e-2), scaler=scaler)
    return residual


@pytest.mark.parametrize("use_linear", [False, True])
def test_float16_training_with_loss_scaling_matches_float32(use_linear):
    unet, reference, latents, denoiser, _ = _setup(use_linear)
    train_residual(reference, unet, denoiser, latents, ALPHAS, "eps", TrainConfig(steps=8, lr=1e-2))
    scaler = LossScaler()
    residual = _train_float16(scaler, use_linear)
    assert all(p.dtype == torch.float32 for p in residual.parameters()), "the residual stays float32"
    a, b = ([layer.weight_delta() for layer in r.layers.values()] for r in (residual, reference))
    difference = float(sum((x - y).norm() ** 2 for x, y in zip(a, b, strict=True)) ** 0.5 /
                       sum(y.norm() ** 2 for y in b) ** 0.5)
    print(f"float16 with loss scaling vs float32: {difference:.4f}, {scaler.skipped} steps skipped")
    assert scaler.skipped == 0 and scaler.scale == 2.0**16
    assert difference < 0.05  # measured 0.024 (conv) and 0.027 (linear): float16's rounding, see test_precisions.py


def _overflowing(denoiser, at_calls, calls):
    """The denoiser, whose output's gradient becomes inf at the given calls (0-based); the loss stays finite."""

    def run(x_t, t, index):
        out = denoiser(x_t, t, index)
        if len(calls) in at_calls:
            out.register_hook(lambda grad: grad * float("inf"))
        calls.append(1)
        return out

    return run


def test_a_step_whose_gradients_overflow_is_skipped_and_is_not_divergence():
    unet, residual, latents, denoiser, _ = _setup()
    snapshots = {}

    def keep(step, losses):
        snapshots[step + 1] = [p.detach().clone() for p in residual.parameters()]

    scaler = LossScaler(growth_interval=1000)
    losses = train_residual(residual, unet, _overflowing(denoiser, {4}, []), latents, ALPHAS,
                            config=TrainConfig(steps=2 * CHECK_EVERY, lr=1e-2), on_step=keep, scaler=scaler)
    assert torch.isfinite(losses).all() and scaler.skipped == 1 and scaler.scale == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(snapshots[5], snapshots[4], strict=True)), "step 5 changed nothing"
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[6], snapshots[5], strict=True))


def test_the_scale_halves_on_overflow_and_doubles_after_good_steps():
    unet, residual, latents, denoiser, _ = _setup()
    scaler = LossScaler(scale=64.0, growth_interval=3)
    train_residual(residual, unet, _overflowing(denoiser, {0, 1}, []), latents, ALPHAS, config=TrainConfig(steps=8),
                   scaler=scaler)
    assert scaler.skipped == 2 and scaler.scale == 64.0 / 4 * 2 * 2  # 2 halvings, then 6 good steps: 2 doublings


def test_gradients_that_overflow_even_unscaled_stop_training():
    unet, residual, latents, denoiser, _ = _setup()
    before = [p.detach().clone() for p in residual.parameters()]
    with pytest.raises(TrainingDiverged, match="overflowed float16 at step 1 even without loss scaling") as e:
        train_residual(residual, unet, _overflowing(denoiser, {0}, []), latents, ALPHAS, config=TrainConfig(steps=5),
                       scaler=LossScaler(scale=1.0))
    assert (e.value.step, e.value.kept_step) == (1, 0)
    assert all(torch.equal(p, b) for p, b in zip(residual.parameters(), before, strict=True))


def test_with_loss_scaling_a_non_finite_loss_is_still_divergence_and_stops_at_once():
    config = TrainConfig(steps=40, lr=1e-2, seed=3)
    unet, residual, latents, denoiser, _ = _setup()
    calls = []
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4. The residual is put back to its state after "
                                               "step 2") as e:
        train_residual(residual, unet, _poisoned(denoiser, 3, float("nan"), calls), latents, ALPHAS, config=config,
                       scaler=LossScaler())
    assert (e.value.step, e.value.kept_step) == (4, 2) and len(calls) == 4, "no waiting for the periodic check"
