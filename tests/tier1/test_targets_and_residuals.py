import pytest
import torch
from helpers import tiny_unet
from personalized_residuals.bench.world.unet import sd15_shaped
from personalized_residuals.residual_core import (
    Concept,
    ResidualError,
    ResidualSet,
    attach,
    fileformat,
    find_targets,
    model_family,
    rank_for,
)


def test_sd15_shapes_give_exactly_the_papers_parameter_count():
    targets = find_targets(sd15_shaped("meta"))
    assert len(targets) == 16 and all(t.conv for t in targets)
    assert sorted({rank_for(t.out_dim, 0.05) for t in targets}) == [16, 32, 64]
    residual = ResidualSet.for_targets(targets)
    assert residual.num_parameters() == 1_239_040
    assert residual.meta.base_family == "sd1"


@pytest.mark.parametrize("use_linear", [False, True])
def test_targets_in_forward_order_with_comfy_block_ids_and_kohya_names(use_linear):
    targets = find_targets(tiny_unet(use_linear))
    assert [t.name for t in targets] == [
        "input_blocks.1.1.proj_out", "input_blocks.2.1.proj_out", "input_blocks.4.1.proj_out",
        "input_blocks.5.1.proj_out", "middle_block.1.proj_out",
        *[f"output_blocks.{i}.1.proj_out" for i in range(6)],
    ]
    assert targets[0].block == ("input", 1) and targets[4].block == ("middle", 0) and targets[5].block == ("output", 0)
    kohya = [fileformat.kohya_key(t.name) for t in targets]  # the file format's names for them
    assert kohya[0] == "lora_unet_down_blocks_0_attentions_0_proj_out"
    assert kohya[3] == "lora_unet_down_blocks_1_attentions_1_proj_out"
    assert kohya[4] == "lora_unet_mid_block_attentions_0_proj_out"
    assert kohya[5] == "lora_unet_up_blocks_0_attentions_0_proj_out"
    assert kohya[10] == "lora_unet_up_blocks_1_attentions_2_proj_out"
    assert [fileformat.module_path(k) for k in kohya] == [t.name for t in targets]
    assert all(t.conv is (not use_linear) for t in targets)


def test_a_model_without_transformer_blocks_is_refused():
    with pytest.raises(ResidualError, match="no transformer blocks"):
        find_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("use_linear", [False, True])
def test_untrained_residual_changes_nothing_and_random_init_does(use_linear):
    unet = tiny_unet(use_linear)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    base = unet(x, t, ctx)
    zero = ResidualSet.for_targets(find_targets(unet), 0.25)
    with attach(unet, [Concept(zero)]):
        assert torch.equal(unet(x, t, ctx), base)
    rand = ResidualSet.for_targets(find_targets(unet), 0.25, init="random", seed=1)
    with attach(unet, [Concept(rand)]):
        assert not torch.allclose(unet(x, t, ctx), base, atol=1e-4)
    assert torch.equal(unet(x, t, ctx), base), "hooks must be gone after the scope"


@pytest.mark.parametrize("use_linear", [False, True])
def test_hook_residual_equals_the_merged_weight(use_linear):
    unet = tiny_unet(use_linear)
    targets = find_targets(unet)
    residual = ResidualSet.for_targets(targets, 0.5, init="random", seed=3)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    with attach(unet, [Concept(residual)]):
        hooked = unet(x, t, ctx)
    with torch.no_grad():
        for target in targets:
            weight = unet.get_submodule(target.name).weight
            weight += residual.layers[target.name].weight_delta().view_as(weight)
    assert torch.allclose(hooked, unet(x, t, ctx), atol=1e-5)


def test_residual_for_another_family_is_refused_with_what_differs():
    sd15 = ResidualSet.for_targets(find_targets(sd15_shaped("meta")))
    with pytest.raises(ResidualError, match="made for SD1.x"):
        sd15.check_fits(find_targets(tiny_unet(False)))
    conv, linear = find_targets(tiny_unet(False)), find_targets(tiny_unet(True))
    with pytest.raises(ResidualError, match="conv.*linear"):
        ResidualSet.for_targets(conv).check_fits(linear)
    assert model_family(linear).startswith("custom-11x")


def test_bad_rank_fraction_and_init_are_refused():
    targets = find_targets(tiny_unet(False))
    with pytest.raises(ResidualError, match="rank_fraction"):
        ResidualSet.for_targets(targets, 0.0)
    with pytest.raises(ResidualError, match="init"):
        ResidualSet.for_targets(targets, init="gaussian")


def test_sd15_residual_on_sd2_and_sdxl_shapes_is_refused_naming_both_families():
    from personalized_residuals.bench.world.unet import SDUNet
    from personalized_residuals.residual_core import Target

    sd15 = ResidualSet.for_targets(find_targets(sd15_shaped("meta")))
    with torch.device("meta"):
        sd2 = find_targets(SDUNet(model_channels=320, channel_mult=(1, 2, 4, 4), attention_levels=(0, 1, 2),
                                  num_heads=8, context_dim=1024, use_linear=True))
    assert model_family(sd2) == "sd2"
    with pytest.raises(ResidualError, match="made for SD1.x but the model is SD2.x: its layer .* is 320x320 \\(conv\\), "
                                            "the model's is 320x320 \\(linear\\). Use a residual trained with "
                                            "this model's family \\(SD2.x\\)"):
        sd15.check_fits(sd2)
    sdxl = [Target(f"t{i}", ("input", i), False, d, d, 2) for i, d in
            enumerate([640] * 5 + [1280] * 6)]
    assert model_family(sdxl) == "sdxl"
    with pytest.raises(ResidualError, match="made for SD1.x \\(16 transformer blocks\\) but the model is SDXL \\(11"):
        sd15.check_fits(sdxl)


@pytest.mark.parametrize("value", [0.0, 1.5, float("nan"), float("inf"), -0.05])
def test_rank_fraction_out_of_range_or_not_finite_is_refused(value):
    with pytest.raises(ResidualError, match=f"rank_fraction must be in \\(0, 1\\], got {value!r}"):
        ResidualSet.for_targets(find_targets(tiny_unet(False)), value)
