import pytest
import torch
from personalized_residuals.residual_core import ResidualError
from personalized_residuals.residual_core.images import square_batch


def test_photos_of_any_size_become_centre_cropped_squares():
    wide = torch.zeros(1, 40, 80, 3)
    wide[:, :, 20:60] = 1.0  # a white centre square in a black frame
    tall_batch = torch.rand(2, 100, 50, 3)
    out = square_batch([wide, tall_batch], 32)
    assert out.shape == (3, 32, 32, 3)
    assert out[0].min() > 0.9, "the centre of the wide photo is kept, its sides cropped"


def test_grayscale_is_repeated_and_alpha_dropped():
    gray, rgba = torch.rand(1, 16, 16, 1), torch.rand(16, 16, 4)
    out = square_batch([gray, rgba], 16)
    assert torch.allclose(out[0, ..., 0], out[0, ..., 2])
    assert torch.allclose(out[1], rgba[..., :3], atol=1e-6)


def test_no_photos_or_bad_shapes_are_refused():
    with pytest.raises(ResidualError, match="No concept photos"):
        square_batch([], 64)
    with pytest.raises(ResidualError, match="Photo 0 has shape"):
        square_batch([torch.rand(8, 8, 2)], 64)
