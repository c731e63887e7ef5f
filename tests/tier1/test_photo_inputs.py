"""Per-photo inputs of training: subject masks (a loss on the subject only) and captions (a prompt per photo)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import WordTokenizer, tiny_unet
from personalized_residuals.residual_core import (
    PhotoPrompts,
    ResidualError,
    ResidualSet,
    TrainConfig,
    find_targets,
    fit,
    latent_masks,
    mask_warnings,
    masked_mse,
    photo_prompts,
    square_batch,
    square_masks,
    train_residual,
)
from personalized_residuals.residual_core.train import _draw

ALPHAS = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
PROMPT = "a photo of a sks dog"


# ---------------------------------------------------------------- the masked loss


def test_masked_loss_counts_only_the_mask_and_its_scale_does_not_depend_on_the_subject_size():
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1
    mask[1, :, 6, 6] = 0.5  # a soft weight counts too
    loss = masked_mse(out, target, mask)
    (grad,) = torch.autograd.grad(loss, out)
    assert not grad[mask.expand_as(grad) == 0].any() and grad[mask.expand_as(grad) > 0].abs().min() > 0

    outside, inside = target.clone(), target.clone()
    outside[:, :, 0] += 5.0  # row 0 is outside the mask
    inside[:, :, 3, 2] += 5.0
    (grad_outside,) = torch.autograd.grad(masked_mse(out, outside, mask), out)
    assert torch.equal(masked_mse(out, outside, mask), loss) and torch.equal(grad_outside, grad)
    assert masked_mse(out, inside, mask) > loss + 0.1

    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(masked_mse(out, target, ones), F.mse_loss(out, target))
    error = torch.full((1, 4, 8, 8), 0.3)  # the same error everywhere: a small and a large subject, same loss
    small, large = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    small[..., 3:5, 3:5], large[..., 1:7, :] = 1, 1
    zero = torch.zeros_like(error)
    assert torch.allclose(masked_mse(error, zero, small), masked_mse(error, zero, large))
    assert torch.allclose(masked_mse(error, zero, small), torch.tensor(0.09))


def test_masks_go_to_the_latent_size_by_area_and_are_dilated_one_latent_pixel():
    masks = torch.zeros(1, 64, 64)
    masks[0, 20:32, 20:32] = 1  # latent pixels 3 fully covered, 2 half covered (rows/columns 16-23)
    plain = latent_masks(masks, (8, 8), dilation=0)[0, 0]
    assert plain.shape == (8, 8) and plain[3, 3] == 1 and plain[2, 3] == 0.5 and plain[2, 2] == 0.25
    assert plain[4:].sum() == 0 and plain[:, 4:].sum() == 0 and plain[:2].sum() == 0
    dilated = latent_masks(masks, (8, 8))[0, 0]  # the default: MASK_DILATION = 1
    assert torch.equal(dilated[2:5, 2:5], torch.ones(3, 3)), "the subject and one latent pixel around it weigh 1"
    assert dilated[1, 3] == 0.5 and dilated[1, 1] == 0.25, "the half-covered pixels' weight spreads one further"
    assert dilated[0].sum() == 0 and dilated[6:].sum() == 0 and dilated[:, 6:].sum() == 0


def _setup():
    torch.manual_seed(0)
    unet = tiny_unet(False)
    ctx = torch.randn(1, 6, 16)
    latents = torch.randn(3, 4, 8, 8)
    residual = ResidualSet.for_targets(find_targets(unet), 0.5, "random", seed=1)
    return unet, residual, latents, (lambda x_t, t, index: unet(x_t, t, ctx.expand(len(x_t), -1, -1)))


def _perturbed(denoiser, where):
    """The denoiser with its output changed where `where` [8, 8] is True: a different prediction there."""
    return lambda x_t, t, index: denoiser(x_t, t, index) + 3.0 * where


def _train(denoiser_of, masks, config):
    unet, residual, latents, denoiser = _setup()
    losses = train_residual(residual, unet, denoiser_of(denoiser), latents, ALPHAS, "eps", config, masks=masks)
    return losses, torch.cat([p.flatten() for p in residual.parameters()])


def test_training_with_masks_ignores_what_happens_outside_them():
    masks = torch.zeros(3, 8, 8)
    masks[:, 2:6, 2:6] = 1  # symmetric, so the flipped photos' masks are the same; dilated: 1:7
    ring = torch.ones(8, 8, dtype=torch.bool)
    ring[1:7, 1:7] = False
    centre = torch.zeros(8, 8, dtype=torch.bool)
    centre[3:5, 3:5] = True
    config = TrainConfig(steps=4, batch_size=2, lr=1e-2, flip=True)
    losses, params = _train(lambda d: d, masks, config)
    outside, outside_params = _train(lambda d: _perturbed(d, ring), masks, config)
    assert torch.equal(losses, outside) and torch.equal(params, outside_params), "loss and gradients unchanged"
    inside, inside_params = _train(lambda d: _perturbed(d, centre), masks, config)
    assert (inside > losses + 0.1).all() and not torch.allclose(params, inside_params)
    unmasked, _ = _train(lambda d: _perturbed(d, ring), None, config)
    assert (unmasked > losses + 0.1).all(), "without masks the same change counts"


def test_a_flipped_photo_uses_its_flipped_mask():
    masks = torch.zeros(3, 8, 8)
    masks[:, :, :3] = 1  # the left side (dilated: columns 0-3)
    right = torch.zeros(8, 8, dtype=torch.bool)
    right[:, 5:] = True  # outside the mask, inside the flipped mask
    config = TrainConfig(steps=6, batch_size=2, lr=1e-2, flip=True, seed=2)
    losses, _ = _train(lambda d: d, masks, config)
    perturbed, _ = _train(lambda d: _perturbed(d, right), masks, config)
    flipped = _draw(config, 3, 1000, (4, 8, 8)).flip.any(1)
    assert flipped.any() and not flipped.all(), "this seed has steps with and without a flipped photo"
    # every step keeps its own loss until an update sees the perturbation: compare the first step of each kind
    first = int(flipped.float().argmax())
    assert torch.equal(losses[:first], perturbed[:first]) and perturbed[first] > losses[first] + 0.1


@pytest.mark.parametrize("masks,match", [
    (torch.ones(2, 8, 8), r"masks must be \[N, H, W\] with one mask per latent \(N = 3\)"),
    (torch.ones(3, 1, 8, 8), r"masks must be \[N, H, W\]"),
    (torch.ones(3, 8, 16), "same aspect"),
    (torch.full((3, 8, 8), 2.0), "values in 0-1"),
    (torch.cat([torch.ones(2, 8, 8), torch.zeros(1, 8, 8)]), "photo.s. 3 is all 0"),
])
def test_fit_refuses_bad_masks_before_any_step(masks, match):
    calls = []
    param = torch.zeros(1, requires_grad=True)
    with pytest.raises(ResidualError, match=match):
        fit([param], lambda x_t, t, index: calls.append(1) or x_t * param, torch.randn(3, 4, 8, 8), ALPHAS,
            config=TrainConfig(steps=2), masks=masks)
    assert not calls


# ---------------------------------------------------------------- masks follow the photos


def test_masks_are_cropped_and_resized_as_the_photos_are():
    wide = torch.zeros(1, 80, 160, 3)
    wide[0, 10:50, 70:140] = 1.0  # a white subject right of centre
    tall = torch.zeros(1, 100, 64, 3)
    tall[0, 40:70, 5:30] = 1.0
    masks = [wide[..., 0], tall[..., 0]]  # each mask is exactly where its photo is white
    squared = square_masks(masks, [wide, tall], 64)
    photos = square_batch([wide, tall], 64)
    assert squared.shape == (2, 64, 64)
    assert torch.allclose(squared, photos[..., 0], atol=1e-6)
    assert 0 < squared[0].mean() < 1 and 0 < squared[1].mean() < 1
    background = square_masks([1 - wide[..., 0], 1 - tall[..., 0]], [wide, tall], 64, marks="background")
    assert torch.allclose(background, squared, atol=1e-6), "mask_marks 'background' inverts: 1 is the subject"
    batch = square_masks([torch.stack([wide[0, ..., 0], wide[0, ..., 0]])], [wide, wide], 64)  # a batch, a 2-D mask
    assert torch.allclose(batch, square_masks([wide[0, ..., 0], wide[0, ..., 0]], [wide, wide], 64))


PHOTOS = [torch.rand(2, 64, 96, 3)]
GOOD = torch.ones(2, 64, 96)
LOAD_IMAGE_EMPTY = torch.zeros(1, 64, 64)  # Load Image's MASK for a picture without transparency


@pytest.mark.parametrize("masks,marks,match", [
    ([GOOD[:1]], "subject", r"masks: 1 mask\(s\) for 2 photo\(s\); give one mask per photo"),
    ([GOOD, GOOD[:1]], "subject", r"masks: 3 mask\(s\) for 2 photo\(s\)"),
    ([torch.ones(2, 64, 64)], "subject", "mask 1 is 64x64 px but photo 1 is 96x64 px.*Make the mask from the photo"),
    ([torch.ones(2, 96, 64)], "subject", "mask 1 is 64x96 px but photo 1 is 96x64 px"),
    ([LOAD_IMAGE_EMPTY, LOAD_IMAGE_EMPTY], "background", "empty 64x64 MASK a loader gives for a picture without "
                                                        "transparency"),
    ([torch.ones(2, 64, 96, 1)], "subject", r"got \(2, 64, 96, 1\); a MASK is \[batch, height, width\] in 0-1"),
    ([torch.ones(64)], "subject", "a MASK is"),
    (["mask.png"], "subject", "got str"),
    ([GOOD * 255], "subject", "mask 1 of 2 has values from 255 to 255; a MASK holds 0-1"),
    ([GOOD - 2], "subject", "mask 1 of 2 has values from -1 to -1"),
    ([(GOOD * 255).to(torch.uint8)], "subject", "mask 1 of 2 holds uint8 integers"),
    ([torch.stack([GOOD[0], torch.full((64, 96), float("nan"))])], "subject", "mask 2 of 2 contains NaN"),
    ([torch.stack([GOOD[0], torch.zeros(64, 96)])], "subject", "the mask of photo 2 is all 0: no subject marked"),
    ([torch.zeros(2, 64, 96)], "subject", "the mask of photos 1, 2 is all 0"),
    ([GOOD], "background", "the mask of photos 1, 2 is all 1: with mask_marks 'background'"),
    ([GOOD], "alpha", "mask_marks must be one of"),
])
def test_bad_masks_are_refused_naming_the_mask_and_the_fix(masks, marks, match):
    with pytest.raises(ResidualError, match=match):
        square_masks(masks, PHOTOS, 64, marks)


def test_a_subject_outside_the_kept_centre_square_is_refused():
    mask = torch.zeros(1, 64, 200)
    mask[0, 20:40, 5:30] = 1  # at the left edge of a long photo: cropped away
    with pytest.raises(ResidualError, match="subject of photo 1 lies outside the centre square"):
        square_masks([mask], [torch.rand(1, 64, 200, 3)], 64)


def test_a_mask_that_covers_the_whole_border_gets_a_warning():
    cut_out = torch.ones(1, 64, 64)
    cut_out[0, 16:48, 16:48] = 0  # Load Image's MASK of a cut-out PNG: 1 on the transparent background
    assert "set mask_marks to 'background'" in " ".join(mask_warnings([cut_out], "subject"))
    assert mask_warnings([cut_out], "background") == []
    assert mask_warnings([1 - cut_out], "subject") == []


# ---------------------------------------------------------------- captions


def test_captions_one_per_line_or_one_string_per_photo():
    tok = WordTokenizer()
    text = "a photo of a sks dog on grass\n\n  a sks dog on a sofa  \na photo of a sks dog on grass\n"
    prompts = photo_prompts([text], 3, PROMPT, tok, "sks", "dog")
    assert prompts == PhotoPrompts(["a photo of a sks dog on grass", "a sks dog on a sofa"], [0, 1, 0])
    listed = photo_prompts(["a sks dog, side", "a sks dog, front"], 2, PROMPT, tok, "sks", "dog")
    assert listed == PhotoPrompts(["a sks dog, side", "a sks dog, front"], [0, 1])
    for nothing in (None, [], [""], ["  \n "]):
        assert photo_prompts(nothing, 4, PROMPT, tok, "sks", "dog") == PhotoPrompts([PROMPT], [0, 0, 0, 0])


@pytest.mark.parametrize("captions,photos,match", [
    (["a sks dog\na sks dog"], 3, r"captions: 2 lines for 3 photo\(s\); give one caption per photo"),
    (["a sks dog", "a sks dog", "a sks dog"], 2, r"captions: 3 captions for 2 photo\(s\)"),
    (["a sks dog\n\na dog on grass"], 2, r"captions, line 3 \(photo 2\): The identifier 'sks' is not in the prompt"),
    (["a sks cat\na sks dog"], 2, r"captions, line 1 \(photo 1\): The class word 'dog' is not in the prompt"),
    (["a sks dog", ""], 2, "captions: caption 2 is empty.*without a .txt file"),
    (["", "a sks dog", " "], 3, "captions: caption 1, caption 3 are empty"),
])
def test_bad_captions_are_refused_naming_the_caption(captions, photos, match):
    with pytest.raises(ResidualError, match=match):
        photo_prompts(captions, photos, PROMPT, WordTokenizer(), "sks", "dog")


def test_each_row_is_denoised_with_its_photos_prompt():
    prompts = PhotoPrompts(["a", "b", "c"], [2, 0, 2, 1])
    calls = []

    def denoise(x_t, t, k):  # conditions every row on prompt k
        calls.append((k, len(x_t)))
        return x_t * 0 + 100 * k + t.view(-1, 1, 1, 1)

    denoiser = prompts.denoiser(denoise)
    index = torch.tensor([3, 0, 1, 2, 0])
    t = torch.tensor([5, 6, 7, 8, 9])
    out = denoiser(torch.zeros(5, 4, 2, 2), t, index)
    expected = torch.tensor([100 * prompts.of_photo[i] for i in index.tolist()]) + t
    assert torch.equal(out[:, 0, 0, 0], expected.float())
    assert sorted(calls) == [(0, 1), (1, 1), (2, 3)], "one call per prompt in the batch"
    calls.clear()
    denoiser(torch.zeros(2, 4, 2, 2), t[:2], torch.tensor([0, 2]))
    assert calls == [(2, 2)], "a batch of one prompt: one call"
    one = PhotoPrompts.same(PROMPT, 3).denoiser(denoise)
    calls.clear()
    one(torch.zeros(2, 4, 2, 2), t[:2], torch.tensor([0, 2]))
    assert calls == [(0, 2)]


def test_training_uses_each_photos_caption_flipped_photos_included():
    prompts = PhotoPrompts(["first", "second"], [1, 0, 1, 0])
    latents = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 8, 8).contiguous()  # photo i is all i
    param = torch.zeros(1, requires_grad=True)
    seen = []

    def denoise(x_t, t, k):  # with alphas_cumprod 1, x_t is the photo itself (or its mirror image)
        photos = x_t.mean((1, 2, 3)).round().long().tolist()
        seen.extend((p, k) for p in photos)
        return x_t * 0 + param

    config = TrainConfig(steps=12, batch_size=3, flip=True, seed=4)
    fit([param], prompts.denoiser(denoise), latents, torch.ones(1000), "eps", config)
    draws = _draw(config, 4, 1000, (4, 8, 8))
    assert draws.flip.any() and len(seen) == 12 * 3
    assert sorted(seen) == sorted((p, prompts.of_photo[p]) for p in draws.index.flatten().tolist())
    assert all(k == prompts.of_photo[p] for p, k in seen)
