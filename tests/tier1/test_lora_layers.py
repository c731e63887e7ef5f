"""LAG for any LoRA (a ResidualSet of kind "lora"): which layers a mask applies to, and when, on SD-shaped UNets."""

import copy

import pytest
import torch
from helpers import tiny_unet
from personalized_residuals.residual_core import (
    Concept,
    LagSession,
    ResidualError,
    ResidualSet,
    attach,
    find_targets,
    lag,
    layer_block,
    low_rank,
)
from personalized_residuals.residual_core.lag import threshold, token_attention

POSITIONS, PROMPT_TOKENS = [2, 3], 6
ST = "input_blocks.1.1"  # the first SpatialTransformer of tiny_unet


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, PROMPT_TOKENS, 16, generator=g)


def _is_lora_layer(module):
    w = getattr(module, "weight", None)
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (w.ndim == 2 or w.shape[2:] == (1, 1))


def _lora(unet, select=lambda path: True, unmaskable="global", seed=0, rank=2):
    """Random rank-`rank` factors (alpha 1: scale 1/rank) on every Linear and 1x1 conv whose path `select`s."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, module in unet.named_modules():
        if _is_lora_layer(module) and select(path):
            w = module.weight
            up, down = torch.randn(w.shape[0], rank, generator=g) * 0.3, torch.randn(rank, w.shape[1], generator=g) * 0.3
            if w.ndim == 4:
                up, down = up[:, :, None, None], down[:, :, None, None]
            layers[path] = low_rank(up, down, alpha=1.0)
    assert layers
    return ResidualSet(layers, kind="lora", unmaskable=unmaskable)


def _merged(unet, lora, select=lambda path: True):
    """A copy of `unet` with the selected layers of `lora` merged into the weights, as a stock LoRA loader does."""
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for path, layer in lora.layers.items():
            if select(path):
                w = merged.get_submodule(path).weight
                w += layer.weight_delta().reshape(w.shape)
    return merged


def _maskable(unet):
    targets = find_targets(unet)
    return lambda path: layer_block(path, targets) is not None


def test_layers_are_placed_by_where_they_act():
    unet = tiny_unet(use_linear=False, depth=2)
    targets = find_targets(unet)
    block = ("input", 1)
    inside = ["proj_in", "proj_out", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
              "transformer_blocks.1.attn1.to_v", "transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.attn2.to_q",
              "transformer_blocks.1.attn2.to_out.0", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.ff.net.2"]
    assert [layer_block(f"{ST}.{p}", targets) for p in inside] == [block] * len(inside)
    for text in ("transformer_blocks.0.attn2.to_k", "transformer_blocks.1.attn2.to_v"):
        assert layer_block(f"{ST}.{text}", targets) is None
    for outside in ("time_embed.0", "input_blocks.1.0.emb_layers.1", "input_blocks.4.0.skip_connection",
                    "middle_block.0.emb_layers.1"):
        assert layer_block(outside, targets) is None
    assert layer_block("middle_block.1.transformer_blocks.0.ff.net.2", targets) == ("middle", 0)
    assert layer_block("output_blocks.5.1.proj_in", targets) == ("output", 5)


def _two_calls(unet, lora, monkeypatch, mask_value):
    """The UNet's output for two calls (different inputs) with `lora` under LAG whose every mask is `mask_value`."""
    monkeypatch.setattr(lag, "threshold", lambda attn, rule, value: torch.full_like(attn, mask_value))
    session, outs = LagSession(POSITIONS, PROMPT_TOKENS), []
    for seed in (0, 1):
        with attach(unet, [Concept(lora, lag=session)]):
            outs.append(unet(*_inputs(seed)))
    return outs


@pytest.mark.parametrize("use_linear", [False, True])
def test_mask_of_ones_is_the_weight_merge_and_zeros_only_the_unmaskable_layers(use_linear, monkeypatch):
    unet = tiny_unet(use_linear, depth=2)
    lora, maskable = _lora(unet), _maskable(unet)
    assert sum(map(maskable, lora.layers)) > 20 and not all(map(maskable, lora.layers)), "both kinds of layers"
    merged = _merged(unet, lora)(*_inputs(1))
    base = unet(*_inputs(1))
    assert (merged - base).abs().max() > 1e-2, "the LoRA must matter for this test to mean anything"
    first, second = _two_calls(unet, lora, monkeypatch, 1.0)
    torch.testing.assert_close(second, merged, rtol=1e-5, atol=1e-5)
    # The first call has no mask yet for the layers before each block's first attn2: they add nothing.
    assert not torch.allclose(first, _merged(unet, lora)(*_inputs(0)), atol=1e-4)
    assert torch.allclose(first, _merged(unet, lora, lambda p: not p.endswith(("proj_in", "0.attn1.to_q", "0.attn1.to_k",
                                                                                "0.attn1.to_v", "0.attn1.to_out.0",
                                                                                "0.attn2.to_q")))(*_inputs(0)), atol=1e-5)
    unmaskable_only = _merged(unet, lora, lambda p: not maskable(p))
    for out, seed in zip(_two_calls(unet, lora, monkeypatch, 0.0), (0, 1), strict=True):
        torch.testing.assert_close(out, unmaskable_only(*_inputs(seed)), rtol=1e-5, atol=1e-5)
    skip = ResidualSet(lora.layers, kind="lora", unmaskable="skip")
    assert all(torch.equal(out, unet(*_inputs(seed)))
               for out, seed in zip(_two_calls(unet, skip, monkeypatch, 0.0), (0, 1), strict=True))


def test_without_lag_every_layer_applies_everywhere_whatever_the_switch():
    unet = tiny_unet(use_linear=True)
    lora = _lora(unet, unmaskable="skip")
    with attach(unet, [Concept(lora)]):
        out = unet(*_inputs())
    torch.testing.assert_close(out, _merged(unet, lora)(*_inputs()), rtol=1e-5, atol=1e-5)


def test_text_layers_are_applied_everywhere_or_skipped_by_the_switch(monkeypatch):
    unet = tiny_unet(use_linear=True, depth=2)
    text = lambda p: p.endswith(("attn2.to_k", "attn2.to_v"))
    lora = _lora(unet, text)
    assert len(lora.layers) == 2 * 2 * len(find_targets(unet))
    merged, base = _merged(unet, lora)(*_inputs(1)), unet(*_inputs(1))
    assert (merged - base).abs().max() > 1e-2
    for mask_value in (0.0, 1.0):  # whatever the mask
        _, out = _two_calls(unet, lora, monkeypatch, mask_value)
        torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-5)
        _, out = _two_calls(unet, ResidualSet(lora.layers, kind="lora", unmaskable="skip"), monkeypatch, mask_value)
        assert torch.equal(out, base)


def _spy(unet, path, store):
    return unet.get_submodule(path).register_forward_hook(lambda m, a, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("use_linear", [False, True])
def test_layers_before_a_blocks_first_attn2_use_the_last_calls_mask_and_after_it_this_calls(use_linear):
    """Depth 2, a LoRA in the first SpatialTransformer only, graded masks (soft rule): each layer's delta is
    rebuilt by hand with the mask it should use, from the attention the LAG run computed."""
    unet = tiny_unet(use_linear, depth=2)
    paths = ["proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_out.0",
             "transformer_blocks.1.attn1.to_q", "transformer_blocks.1.attn2.to_q", "transformer_blocks.1.ff.net.2",
             "proj_out"]
    lora = _lora(unet, lambda p: p in {f"{ST}.{q}" for q in paths})
    heads = unet.get_submodule(f"{ST}.transformer_blocks.0.attn2").heads
    session, block = LagSession(POSITIONS, PROMPT_TOKENS, "soft", 1.0), ("input", 1)
    previous = torch.zeros(2, 64)  # no mask before the first call: the layers before attn2 add nothing
    for seed in (0, 1):
        qk = {}
        with attach(unet, [Concept(lora, lag=session)]):
            handles = [_spy(unet, f"{ST}.transformer_blocks.{j}.attn2.{p}", qk.setdefault((j, p), []))
                       for j in (0, 1) for p in ("to_q", "to_k")]
            out = unet(*_inputs(seed))
        for h in handles:
            h.remove()
        pos = torch.tensor(POSITIONS)
        maps = [token_attention(qk[(j, "to_q")][0], qk[(j, "to_k")][0], heads, pos) for j in (0, 1)]
        depth0, both = threshold(maps[0], "soft", 1.0), threshold((maps[0] + maps[1]) / 2, "soft", 1.0)
        uses = dict(zip(paths, [previous, previous, depth0, depth0, depth0, both, both], strict=True))

        def add(path, mask):
            def hook(module, args, y):
                x = args[0]
                m = mask.view(x.shape[0], 1, *x.shape[2:]) if x.ndim == 4 else mask[:, :, None]
                return y + lora.layers[f"{ST}.{path}"].delta(x) * m
            return hook

        handles = [unet.get_submodule(f"{ST}.{p}").register_forward_hook(add(p, m)) for p, m in uses.items()]
        by_hand = unet(*_inputs(seed))
        for h in handles:
            h.remove()
        torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-6)
        assert torch.allclose(session.last[(block, None)][0], both)
        assert not torch.allclose(depth0, both, atol=1e-3), "the depths differ, so the test tells them apart"
        previous = both


def test_a_lora_and_a_residual_share_one_image_and_its_overlap_rule():
    unet = tiny_unet(use_linear=True, depth=2)
    targets = find_targets(unet)
    residual = ResidualSet.for_targets(targets, 0.5, init="random", seed=2)
    lora = _lora(unet, _maskable(unet), seed=3)
    x = _inputs()

    def run(*concepts):
        with attach(unet, [Concept(c, 1.0, LagSession(POSITIONS, PROMPT_TOKENS, "soft", 1.0)) for c in concepts]):
            return unet(*x)

    # Same words, same rule: equal scores everywhere, ties go to the first concept, so the second applies nowhere.
    assert torch.equal(run(residual, lora), run(residual))
    assert torch.equal(run(lora, residual), run(lora))
    assert not torch.allclose(run(lora), run(residual), atol=1e-4)


def test_a_layer_that_sees_other_tokens_than_its_block_is_left_out():
    """ToMe / HyperTile merge or tile self-attention tokens: such a layer's positions can't be matched to the mask."""
    unet = tiny_unet(use_linear=True)
    path = f"{ST}.transformer_blocks.0.attn1.to_q"
    lora = _lora(unet, lambda p: p == path)
    module, tokens = unet.get_submodule(path), torch.randn(2, 16, 16)  # its block has 2x64
    with attach(unet, [Concept(lora, lag=LagSession(POSITIONS, PROMPT_TOKENS))]):
        unet(*_inputs())
        with pytest.warns(UserWarning, match="left out"):
            out = module(tokens)
    assert torch.equal(out, module(tokens))


def test_a_lora_for_another_model_names_the_layer():
    unet, other = tiny_unet(use_linear=True), tiny_unet(use_linear=False)
    lora = _lora(other, lambda p: p.endswith("proj_in"))
    with pytest.raises(ResidualError, match=r"layer input_blocks.1.1.proj_in is 16x16 \(1x1 conv\), the model's is 16x16 "
                                            r"\(linear\).*another model"):
        with attach(unet, [Concept(lora)]):
            pass
    missing = ResidualSet({"input_blocks.9.1.proj_in": next(iter(lora.layers.values()))}, kind="lora")
    with pytest.raises(ResidualError, match="layer input_blocks.9.1.proj_in that the model lacks"):
        missing.check_fits(find_targets(unet), unet)
    with pytest.raises(ResidualError, match="unmaskable must be one of"):
        ResidualSet({}, kind="lora", unmaskable="mask")
    with pytest.raises(ResidualError, match="1x1-conv"):
        low_rank(torch.zeros(4, 2, 1, 1), torch.zeros(2, 4, 3, 3))  # a 3x3 conv (LoCon)
    assert low_rank(torch.zeros(4, 2), torch.zeros(2, 4), conv=True).conv, "2-D factors of a 1x1 conv"
