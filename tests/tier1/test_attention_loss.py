import pytest
import torch
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
from personalized_residuals.residual_core.attention_loss import AttentionLoss, map_loss

ALPHAS = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)


def test_a_map_inside_the_mask_costs_nothing_and_one_outside_costs_a_lot():
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1
    inside = mask.flatten(1) * 0.3  # the same shape at any scale: normalised by its maximum
    assert float(map_loss(inside, (8, 8), mask)) < 1e-12
    near = inside + 0.01 * torch.rand(2, 64)
    outside = (1 - mask).flatten(1) * 0.3
    small, large = float(map_loss(near, (8, 8), mask)), float(map_loss(outside, (8, 8), mask))
    assert small < 1e-3 and large > 0.9
    # on a coarser grid the mask is averaged onto it: a 2x2 cell half inside weighs 0.5
    coarse = torch.nn.functional.interpolate(mask, size=(4, 4), mode="area").flatten(1)
    assert float(map_loss(coarse, (4, 4), mask)) < 1e-12


def _setup(use_linear=False):
    unet = tiny_unet(use_linear)
    torch.manual_seed(1)
    ctx = torch.randn(1, 6, 16)
    latents = torch.randn(2, 4, 8, 8)
    masks = torch.zeros(2, 8, 8)
    masks[0, 1:5, 1:5] = 1
    masks[1, 3:8, 2:7] = 1
    residual = ResidualSet.for_targets(find_targets(unet), 0.5, seed=0)
    return unet, residual, latents, masks, (lambda x_t, t, index: unet(x_t, t, ctx.expand(len(x_t), -1, -1)))


@pytest.mark.parametrize("use_linear", [False, True])
def test_the_loss_reaches_the_residual_of_an_earlier_block_and_only_it(use_linear):
    unet, residual, latents, masks, denoiser = _setup(use_linear)
    with torch.no_grad():  # a non-zero residual, so both factors get gradients
        for layer in residual.layers.values():
            layer.up.normal_(0, 0.1)
    residual.requires_grad_(True)
    loss_fn = AttentionLoss(unet, [1, 2], weight=1.0)
    first = find_targets(unet)[0].name
    with frozen(unet), attach(unet, [Concept(residual)]), loss_fn.recording():
        denoiser(latents, torch.tensor([500, 900]), torch.arange(2))
    assert len(loss_fn._maps) == len(find_targets(unet))  # a map per block
    loss = loss_fn(masks[:, None])
    assert loss.requires_grad and float(loss.detach()) > 0
    loss.backward()
    grads = {name: sum(float(p.grad.abs().sum()) for p in layer.parameters() if p.grad is not None)
             for name, layer in residual.layers.items()}
    assert grads[first] > 0, "the first block's residual reaches later blocks' queries"
    assert all(p.grad is None for p in unet.parameters())


def test_the_loss_needs_masks_and_maps():
    unet, residual, latents, masks, denoiser = _setup()
    loss_fn = AttentionLoss(unet, [1])
    with pytest.raises(ResidualError, match="masks"):
        loss_fn(None)
    with pytest.raises(ResidualError, match="recorded"):
        loss_fn(masks[:, None])
    with pytest.raises(ResidualError, match="masks"):
        train_residual(residual, unet, denoiser, latents, ALPHAS, "eps", TrainConfig(steps=2), attention_loss=loss_fn)


def _train(attention_weight):
    unet, residual, latents, masks, denoiser = _setup()
    loss_fn = None if attention_weight is None else AttentionLoss(unet, [1, 2], weight=attention_weight)
    losses = train_residual(residual, unet, denoiser, latents, ALPHAS, "eps", TrainConfig(steps=12, lr=1e-2, seed=3),
                            masks=masks, attention_loss=loss_fn)
    return losses, torch.cat([p.detach().flatten() for p in residual.parameters()])


def test_without_the_attention_loss_training_is_bit_identical():
    losses, params = _train(None)
    zero_losses, zero_params = _train(0.0)  # hooks recording, the loss added times 0: nothing may change
    assert torch.equal(losses, zero_losses) and torch.equal(params, zero_params)
    guided_losses, guided_params = _train(1.0)
    assert not torch.equal(guided_params, params)
    assert float(guided_losses[0]) > float(losses[0]), "same first step: the attention loss adds to it"
