"""The joint-attention map (Flux's counterpart of SD's cross-attention map), on plain tensors."""

import pytest
import torch
from personalized_residuals.residual_core import ResidualError
from personalized_residuals.residual_core.joint_attention import patch_grid, text_attention


def explicit(q, k, text, columns):
    """Softmax of image queries over the text keys, written out per head."""
    d = q.shape[-1]
    maps = []
    for h in range(q.shape[1]):
        logits = q[:, h, text:] @ k[:, h, :text].transpose(-1, -2) / d**0.5
        maps.append(logits.softmax(-1)[..., columns].sum(-1))
    return torch.stack(maps, 1).mean(1)


@pytest.mark.parametrize("heads_at_once", [1, 3, 8])
def test_the_map_is_the_image_x_text_softmax_renormalised_over_text(heads_at_once):
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 7 + 12, 8), torch.randn(2, 6, 7 + 12, 8)
    columns = torch.tensor([2, 3])
    got = text_attention(q, k, 7, columns, heads_at_once)
    assert got.shape == (2, 12)
    torch.testing.assert_close(got, explicit(q, k, 7, columns))
    # Image keys play no part: renormalised over the text tokens only.
    k2 = k.clone()
    k2[:, :, 7:] = torch.randn_like(k2[:, :, 7:])
    torch.testing.assert_close(text_attention(q, k2, 7, columns), got)
    # All text columns: every image token's mass is 1.
    torch.testing.assert_close(text_attention(q, k, 7, torch.arange(7)), torch.ones(2, 12))


def test_a_concept_token_the_image_attends_to_gets_the_mass_where_it_does():
    q, k = torch.zeros(1, 1, 3 + 4, 2), torch.zeros(1, 1, 3 + 4, 2)
    k[0, 0, 1] = torch.tensor([10.0, 0.0])  # text token 1 answers queries along x
    q[0, 0, 3 + 2] = torch.tensor([5.0, 0.0])  # only image token 2 asks along x
    got = text_attention(q, k, 3, torch.tensor([1]))
    assert int(got.argmax()) == 2 and float(got[0, 2]) > 0.99 and float(got[0, 0]) == pytest.approx(1 / 3)


def test_bad_text_length_is_named():
    q = torch.zeros(1, 1, 5, 2)
    with pytest.raises(ResidualError, match="5 text tokens"):
        text_attention(q, q, 5, torch.tensor([0]))


def test_patch_values_land_on_their_2x2_latent_pixels_and_odd_sizes_crop():
    values = torch.arange(6.0).view(1, 6)  # a 2x3 patch grid
    grid = patch_grid(values, 4, 6)
    assert grid[0, 0, :2].tolist() == [0, 0] and grid[0, 3, 5] == 5 and grid[0, 2, 0] == 3
    assert patch_grid(values, 3, 5).shape == (1, 3, 5)
