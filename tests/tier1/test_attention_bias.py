"""Attention bias between concepts (residual_core/attention_bias.py): each concept's words are not attended where
another concept's mask lies, through an attention override that chains any other."""

import math

import pytest
import torch
from helpers import tiny_unet
from personalized_residuals.bench.world.unet import CrossAttention, attention, attention_override
from personalized_residuals.residual_core import CallLayout, Concept, LagSession, ResidualSet, attach, find_targets
from personalized_residuals.residual_core.attention_bias import FLOOR, AttentionBias

BLOCK = ("input", 1)


def session(position: int, strategy: str = "bias") -> LagSession:
    s = LagSession([position], 6, "max_fraction", 0.5, strategy=strategy)
    s.begin_call(CallLayout([1, 0]))  # chunk 0: the negative (a follower), chunk 1: the LAG prompt
    return s


def test_a_concepts_words_are_pushed_down_where_the_others_mask_lies_and_only_there():
    a, b = session(2), session(4)
    ma, mb = torch.tensor([[1.0, 1, 0, 0]]), torch.tensor([[0.0, 0, 1, 0.5]])
    a.last[(BLOCK, None)], b.last[(BLOCK, None)] = (ma, ma), (mb, mb)
    bias = AttentionBias([a, b], [True, True]).logits(BLOCK, 2, 4, 6, torch.device("cpu"), torch.float32)
    assert bias.shape == (2, 1, 4, 6)
    assert not bias[0].any(), "the negative prompt's rows are biased"
    want = torch.zeros(4, 6)
    want[:, 2] = torch.log((1 - mb[0]).clamp(min=math.exp(FLOOR)))  # A's word where B's mask lies (and half of it)
    want[:, 4] = torch.log((1 - ma[0]).clamp(min=math.exp(FLOOR)))
    assert torch.allclose(bias[1, 0], want)
    only_a = AttentionBias([a, b], [True, False]).logits(BLOCK, 2, 4, 6, torch.device("cpu"), torch.float32)
    assert only_a[1, 0, :, 2].ne(0).any() and not only_a[1, 0, :, 4].any()


def test_no_bias_before_both_concepts_have_a_mask_in_the_block():
    a, b = session(2), session(4)
    a.last[(BLOCK, None)] = (torch.ones(1, 4), torch.ones(1, 4))
    assert AttentionBias([a, b], [True, True]).logits(BLOCK, 2, 4, 6, torch.device("cpu"), torch.float32) is None


def test_the_override_adds_to_an_existing_mask_and_chains_the_previous_override():
    a, b = session(2), session(4)
    a.last[(BLOCK, None)] = (torch.tensor([[1.0, 0, 0, 0]]),) * 2
    b.last[(BLOCK, None)] = (torch.tensor([[0.0, 1, 0, 0]]),) * 2
    bias = AttentionBias([a, b], [True, True])
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(args[4] if len(args) > 4 else kwargs.get("mask"))
        return func(*args, **kwargs)

    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    keep = torch.ones(2, 4, 6, dtype=torch.bool)
    keep[:, :, 5] = False  # another node's boolean mask: never attend to token 5
    bias.expect(BLOCK, 6)
    out = bias.override(previous)(attention, q, k, v, 2, keep)
    mask = seen[-1]
    assert mask.shape == (2, 1, 4, 6) and torch.isinf(mask[..., 5]).all()
    assert mask[1, 0, 1, 2] == pytest.approx(FLOOR) and mask[1, 0, 0, 4] == pytest.approx(FLOOR)
    assert mask[1, 0, 0, 2] == 0 and not mask[0, :, :, :5].any()
    assert torch.allclose(out, attention(q, k, v, 2, mask))
    # the next attention call (not announced by a to_k hook: self-attention) passes through untouched
    bias.override(previous)(attention, q, q, q, 2)
    assert seen[-1] is None


def test_in_a_unet_the_bias_changes_only_the_calls_after_the_masks_exist_and_leaves_nothing_behind():
    unet = tiny_unet(False, depth=1)
    targets = find_targets(unet)
    res = [ResidualSet.for_targets(targets, 0.5, init="random", seed=s) for s in (2, 3)]
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 6, 16)

    def run(strategy, strength=1.0, steps=2):
        sessions = [LagSession([2], 6, "max_fraction", 0.3, strategy=strategy),
                    LagSession([4], 6, "max_fraction", 0.3, strategy=strategy)]
        outs = []
        for _ in range(steps):
            for s in sessions:
                s.begin_evaluation()
            chain = [Concept(r, strength, s) for r, s in zip(res, sessions, strict=True)]
            with attach(unet, chain, call=CallLayout([1, 0])) as attached, \
                    attention_override(unet, attached.attention_override):
                assert (attached.attention_override is not None) == ("bias" in strategy)
                outs.append(unet(x, t, ctx))
        return outs

    with torch.no_grad():
        plain, biased = run("per_block"), run("bias")
        assert torch.equal(plain[0], biased[0]), "the first call has no masks yet: nothing to bias"
        assert not torch.allclose(plain[1][1], biased[1][1]), "the bias did not reach the attention"
        # without residuals (strength 0) the negative prompt's row is the base model's: not biased
        assert torch.equal(run("per_block", 0.0)[1][0], run("bias", 0.0)[1][0])
    assert all(m.override is None for m in unet.modules() if isinstance(m, CrossAttention))
