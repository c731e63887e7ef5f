import pytest
import torch
from helpers import tiny_unet
from personalized_residuals.residual_core import (
    CallLayout,
    Concept,
    LagSession,
    ResidualError,
    ResidualSet,
    attach,
    find_targets,
    lag,
)
from personalized_residuals.residual_core.lag import check_rule, threshold, token_attention


def test_token_attention_is_the_softmax_mass_on_the_tokens_mean_over_heads():
    torch.manual_seed(0)
    q, k, heads, pos = torch.randn(2, 6, 8), torch.randn(2, 5, 8), 2, torch.tensor([1, 3])
    got = token_attention(q, k, heads, pos)
    qh, kh = q.view(2, 6, 2, 4).transpose(1, 2), k.view(2, 5, 2, 4).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2) / 2.0).softmax(-1)
    assert torch.allclose(got, probs[..., [1, 3]].sum(-1).mean(1), atol=1e-6)


def test_threshold_rules():
    a = torch.tensor([[0.1, 0.2, 0.5, 1.0, 0.3]])
    assert threshold(a, "max_fraction", 0.5).tolist() == [[0, 0, 1, 1, 0]]
    assert threshold(a, "median", 0).tolist() == [[0, 0, 1, 1, 0]]  # median 0.3
    assert threshold(a, "mean", 0).tolist() == [[0, 0, 1, 1, 0]]  # mean 0.42
    assert torch.allclose(threshold(a, "soft", 1.0), a)
    assert torch.allclose(threshold(a, "soft", 2.0), a**2)
    with pytest.raises(ResidualError, match="mask rule"):
        threshold(a, "otsu", 0)
    for rule, value in (("max_fraction", 0.0), ("max_fraction", 1.5), ("soft", 0.0), ("nope", 1)):
        with pytest.raises(ResidualError):
            check_rule(rule, value)


def _outputs(unet, residual, monkeypatch, mask_value):
    """UNet output with the residual under LAG whose every mask is `mask_value`, and globally."""
    monkeypatch.setattr(lag, "threshold", lambda attn, rule, value: torch.full_like(attn, mask_value))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 6, 16)
    base = unet(x, t, ctx)
    with attach(unet, [Concept(residual, lag=LagSession([2, 3], 6))]):
        lagged = unet(x, t, ctx)
    with attach(unet, [Concept(residual)]):
        global_ = unet(x, t, ctx)
    return base, lagged, global_


@pytest.mark.parametrize("use_linear", [False, True])
def test_mask_of_ones_is_the_global_residual_and_zeros_the_base_exactly(use_linear, monkeypatch):
    unet = tiny_unet(use_linear, depth=2)
    residual = ResidualSet.for_targets(find_targets(unet), 0.5, init="random", seed=2)
    base, lagged, global_ = _outputs(unet, residual, monkeypatch, 1.0)
    assert torch.equal(lagged, global_) and not torch.allclose(lagged, base, atol=1e-4)
    base, lagged, _ = _outputs(unet, residual, monkeypatch, 0.0)
    assert torch.equal(lagged, base)


def _qk(rows, n=4, t=6, c=8):
    torch.manual_seed(rows)
    return torch.randn(rows, n, c), torch.randn(rows, t, c)


def test_unconditional_rows_reuse_the_mask_of_their_sample():
    session = LagSession([1], 6, "max_fraction", 0.9)
    session.begin_call(CallLayout([1, 0]))  # ComfyUI's usual order: 2 uncond rows, then 2 cond rows
    q, k = _qk(4)
    session.record_q(("input", 1), q)
    session.record_k(("input", 1), k, heads=2)
    mask = session.mask(("input", 1), 4, (2, 2), q.device)
    assert torch.equal(mask[:2], mask[2:])
    expected = threshold(token_attention(q[2:], k[2:], 2, torch.tensor([1])), "max_fraction", 0.9)
    assert torch.equal(mask[2:], expected)
    assert not torch.equal(mask[2], mask[3]), "each sample has its own mask"


def test_uncond_only_calls_reuse_the_blocks_last_mask_and_start_with_none():
    session = LagSession([1], 6)
    session.begin_call(CallLayout([1]))
    assert session.mask(("middle", 0), 2, (2, 2), torch.device("cpu")).sum() == 0  # nothing seen yet: base model
    session.begin_call(CallLayout([0]))
    q, k = _qk(2)
    session.record_q(("middle", 0), q)
    session.record_k(("middle", 0), k, heads=2)
    cond = session.mask(("middle", 0), 2, (2, 2), q.device)
    session.begin_call(CallLayout([1]))
    assert torch.equal(session.mask(("middle", 0), 2, (2, 2), q.device), cond)
    session.reset()
    assert session.mask(("middle", 0), 2, (2, 2), q.device).sum() == 0


def test_maps_average_over_the_blocks_depth():
    session = LagSession([0], 6, "soft", 1.0)
    session.begin_call(CallLayout())
    (q1, k1), (q2, k2) = _qk(1), _qk(2)
    for q, k in ((q1, k1), (q2[:1], k2[:1])):
        session.record_q(("output", 3), q)
        session.record_k(("output", 3), k, heads=2)
    pos = torch.tensor([0])
    mean = (token_attention(q1, k1, 2, pos) + token_attention(q2[:1], k2[:1], 2, pos)) / 2
    assert torch.allclose(session.mask(("output", 3), 1, (2, 2), q1.device), threshold(mean, "soft", 1.0))


def test_a_shorter_prompt_repeated_beside_a_longer_one_keeps_its_columns():
    session = LagSession([1, 2], 77)
    assert session.columns(154, torch.device("cpu")).tolist() == [1, 2, 78, 79]
    with pytest.raises(ResidualError, match="the conditional rows must hold the LAG prompt"):
        session.columns(100, torch.device("cpu"))


def test_mean_masks_record_where_the_residual_applied():
    session = LagSession([1], 6, "max_fraction", 0.5)
    for _ in range(3):
        session.begin_call(CallLayout([0]))
        q, k = _qk(1)
        session.record_q(("input", 1), q)
        session.record_k(("input", 1), k, heads=2)
        last = session.mask(("input", 1), 1, (2, 2), q.device)
    assert torch.equal(session.mean_masks()[("input", 1)], last)  # same inputs each call
    with pytest.raises(ResidualError):
        LagSession([], 77)


def test_overlaps_go_to_the_concept_that_attends_most_relative_to_its_own_peak():
    from personalized_residuals.residual_core import resolve_overlaps

    a_mask, b_mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    a_score, b_score = torch.tensor([[0.9, 1.0, 0.1, 0.2]]), torch.tensor([[0.5, 0.3, 1.0, 0.8]])
    a, b = resolve_overlaps([a_mask, b_mask], [a_score, b_score])
    assert a.tolist() == [[1, 1, 0, 0]] and b.tolist() == [[0, 0, 1, 1]]
    assert resolve_overlaps([a_mask], [a_score]) == [a_mask]


def _two_concepts(use_linear):
    from personalized_residuals.residual_core import Concept

    unet = tiny_unet(use_linear, depth=2)
    targets = find_targets(unet)
    a = ResidualSet.for_targets(targets, 0.5, init="random", seed=2)
    b = ResidualSet.for_targets(targets, 0.5, init="random", seed=3)
    return unet, Concept, a, b, (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 6, 16))


@pytest.mark.parametrize("use_linear", [False, True])
def test_two_concepts_a_concept_applies_only_inside_its_own_mask(use_linear, monkeypatch):
    unet, Concept, a, b, (x, t, ctx) = _two_concepts(use_linear)
    with attach(unet, [Concept(a, lag=LagSession([2], 6, "soft", 1.0))]):
        a_alone = unet(x, t, ctx)
    # Same words, same rule: equal scores everywhere, ties go to the first concept, so b applies nowhere.
    with attach(unet, [Concept(a, 1.0, LagSession([2], 6, "soft", 1.0)), Concept(b, 1.0, LagSession([2], 6, "soft", 1.0))]):
        tied = unet(x, t, ctx)
    assert torch.equal(tied, a_alone)
    # A concept whose mask is empty adds nothing.
    real = lag.threshold
    monkeypatch.setattr(lag, "threshold", lambda attn, rule, value: real(attn, rule, value) * (rule != "mean"))
    with attach(unet, [Concept(a, 1.0, LagSession([2], 6, "soft", 1.0)), Concept(b, 1.0, LagSession([4], 6, "mean", 0))]):
        assert torch.equal(unet(x, t, ctx), a_alone)
    with attach(unet, [Concept(a, 1.0, LagSession([2], 6, "soft", 1.0)), Concept(b, 1.0, LagSession([4], 6, "soft", 1.0))]):
        assert not torch.allclose(unet(x, t, ctx), a_alone, atol=1e-5), "b's own tokens give it positions of its own"
