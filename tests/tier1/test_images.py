import pytest
import torch
from personalized_residuals.residual_core import ResidualError
from personalized_residuals.residual_core.images import photo_warnings, square_batch


def test_photos_of_any_size_become_centre_cropped_squares():
    wide = torch.zeros(1, 80, 160, 3)
    wide[:, :, 40:120] = 1.0  # a white centre square in a black frame
    tall_batch = torch.rand(2, 100, 64, 3)
    out = square_batch([wide, tall_batch], 64)
    assert out.shape == (3, 64, 64, 3)
    assert out[0].min() > 0.9, "the centre of the wide photo is kept, its sides cropped"


def test_grayscale_is_repeated_and_alpha_composited_over_white():
    gray, rgba = torch.rand(1, 64, 64, 1), torch.rand(64, 64, 4)
    rgba[:8, :, 3] = 0.0  # a transparent band
    out = square_batch([gray, rgba], 64)
    assert torch.allclose(out[0, ..., 0], out[0, ..., 2])
    alpha = rgba[..., 3:]
    assert torch.allclose(out[1], rgba[..., :3] * alpha + (1 - alpha), atol=1e-5)
    assert out[1, :8].min() == 1.0, "fully transparent pixels become white"


def test_resampling_overshoot_is_clamped():
    photo = torch.rand(64, 64, 3) * 1.16 - 0.08  # what a bicubic resize leaves at sharp edges
    out = square_batch([photo], 64)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("images,match", [
    ([], "no photos"),
    ([torch.zeros(0, 64, 64, 3)], "no photos"),
    ([torch.rand(64, 64)], r"got \(64, 64\); an IMAGE is \[batch, height, width, channels\]"),
    ([torch.rand(1, 1, 64, 64, 3)], "an IMAGE is"),
    (["photo.png"], "got str"),
    ([torch.rand(64, 64, 5)], "photo 1 of 1 has 5 channels"),
    ([torch.rand(2, 64, 64, 3), torch.rand(48, 80, 3)], "photo 3 of 3 is 80x48 px; each side must be 64 to 4096 px"),
    ([torch.rand(32, 32, 3)], "Use a larger photo"),
    ([torch.rand(64, 4100, 3)], "4100x64 px.*Scale it down"),
    ([(torch.rand(64, 64, 3) * 255).to(torch.uint8)], "uint8 integers.*Divide 8-bit data by 255"),
    ([(torch.rand(64, 64, 3) * 65535).to(torch.int32)], "int32 integers.*65535"),
    ([torch.rand(64, 64, 3) * 65535], "values from .* to .*8-bit data: divide by 255; 16-bit data: divide by 65535"),
    ([torch.rand(64, 64, 3) * 255], "IMAGEs hold 0-1"),
    ([torch.rand(64, 64, 3) * 2 - 1], r"Data in \[-1, 1\]: rescale with \(x \+ 1\) / 2"),
    ([torch.full((64, 64, 3), float("nan"))], "photo 1 of 1 contains NaN or infinite values"),
    ([torch.rand(64, 64, 3), torch.full((64, 64, 3), float("inf"))], "photo 2 of 2 contains NaN"),
])
def test_bad_photos_are_refused_naming_the_photo_and_the_fix(images, match):
    with pytest.raises(ResidualError, match=match):
        square_batch(images, 64)
    with pytest.raises(ResidualError, match=match):
        photo_warnings(images, 64)


def test_16_bit_float_images_in_range_are_fine():
    """A 16-bit PNG reaches an IMAGE as float in [0, 1]; half precision too."""
    out = square_batch([torch.rand(64, 64, 3, dtype=torch.float64), torch.rand(64, 64, 3).half()], 64)
    assert out.dtype == torch.float32 and out.shape == (2, 64, 64, 3)


def test_warnings_for_legal_but_weak_photos():
    colour = torch.rand(3, 512, 512, 3)
    assert photo_warnings([colour], 512) == []
    gray = torch.rand(512, 512, 1).expand(-1, -1, 3)  # Load Image gives gray files 3 equal channels
    rgba = torch.rand(512, 512, 4)
    lines = photo_warnings([colour, gray, rgba, torch.rand(64, 300, 3), torch.rand(100, 100, 3)], 512)
    assert lines == [
        "photo 4 without colour (grayscale): the concept is learned with less colour.",
        "photo 5 with transparent areas: they were filled with white.",
        "photos 6, 7 smaller than the training resolution 512 px: upscaled, may look soft.",
        "photo 6 more than twice as long as wide: only the centre square is used.",
    ]
    one = photo_warnings([torch.rand(1, 512, 512, 3)], 512)
    assert len(one) == 1 and one[0].startswith("Only 1 photo")
