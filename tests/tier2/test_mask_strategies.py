"""The LAG nodes' mask_strategy input: every strategy in a two-concept chain, through the stock KSampler."""

import pytest
import torch
from comfy_env import concept_residual, ksample, run, spy_sampling
from personalized_residuals.nodes import comfy_model
from personalized_residuals.nodes.lag import PATCH_KEY, LagSampler
from personalized_residuals.residual_core import DEFAULT_MASK_STRATEGY, MASK_STRATEGIES, MaskStrategy, ResidualError
from personalized_residuals.residual_core.masks import FREEFUSE_STEP, WARMUP_OF

import nodes as comfy_nodes

PROMPT = "a photo of a sks dog and a zwx cat in a garden"
STEPS = FREEFUSE_STEP + 2


def _chain(model, clip, strategy):
    m, positive = model, None
    for ident, cls, seed in (("sks", "dog", 1), ("zwx", "cat", 2)):
        residual = concept_residual(model, seed)
        residual.meta.identifier, residual.meta.class_word = ident, cls
        m, positive = run(LagSampler, m, residual, clip, PROMPT, strength=1.0, mode="LAG", mask_rule="max_fraction",
                          mask_value=0.5, start_percent=0.0, end_percent=1.0, mask_strategy=strategy)
    return m, positive


def test_the_default_is_offered_and_a_bad_strategy_is_refused_before_sampling(sd15, clip):
    assert DEFAULT_MASK_STRATEGY in MASK_STRATEGIES
    schema = {i.id: i for i in LagSampler.define_schema().inputs}
    assert schema["mask_strategy"].default == DEFAULT_MASK_STRATEGY and schema["mask_strategy"].tooltip
    with pytest.raises(ResidualError, match="mask strategy"):
        _chain(sd15, clip, "everywhere")
    # A prompt saved before the input existed (no mask_strategy) keeps the per-block masks it had.
    residual = concept_residual(sd15, 1)
    residual.meta.identifier, residual.meta.class_word = "sks", "dog"
    m = run(LagSampler, sd15, residual, clip, PROMPT, 1.0, "LAG", "max_fraction", 0.5, 0.0, 1.0)[0]
    assert m.get_attachment(PATCH_KEY).sessions[0].strategy.name == "per_block"


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_two_concepts_one_model_evaluation_per_step_masks_never_overlap(strategy, sd15, clip, monkeypatch):
    m, positive = _chain(sd15, clip, strategy)
    patch = m.get_attachment(PATCH_KEY)
    assert [s.strategy.name for s in patch.sessions] == [strategy, strategy]
    spy = spy_sampling(monkeypatch)
    out = ksample(m, positive, comfy_nodes.CLIPTextEncode().encode(clip, "")[0], steps=STEPS)
    assert len(spy.evaluations) == STEPS, "one model evaluation per step, whatever the strategy"
    assert torch.isfinite(out).all()
    pairs = [((a.evaluation, a.mask), (b.evaluation, b.mask)) for a, b in spy.pairs()]
    assert all(float((a * b).max()) == 0 for (_, a), (_, b) in pairs), "masks never overlap"
    # The warm-up is a share of the KSampler's schedule: the steps whose middle lies in its first warmup/25.
    warming = [(step + 0.5) / STEPS < MaskStrategy(strategy).warmup / WARMUP_OF for step in range(STEPS)]
    assert not any(float(a.sum()) > 0 for (step, a), _ in pairs if warming[step]), "nothing during the warm-up"
    assert any(float(a.sum()) > 0 for (step, a), _ in pairs if not warming[step]), "the first concept applies after it"
    if strategy == "freefuse":  # nothing before the masks are fixed
        assert all(float(a.sum()) == 0 and float(b.sum()) == 0 for (step, a), (_, b) in pairs if step < FREEFUSE_STEP)


def test_the_bias_reaches_the_attention_and_another_nodes_override_still_runs(sd15, clip):
    """'bias': each concept's words are kept out of the other's mask, through an attention override installed for
    each UNet call in front of any other node's (which still sees every attention call, now with our mask)."""
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    seen = []

    def theirs(func, *args, **kwargs):
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        seen.append(mask is not None)
        return func(*args, **kwargs)

    outs, counts = {}, {}
    for strategy in ("per_block", "bias"):
        m, positive = _chain(sd15, clip, strategy)
        m.model_options.setdefault("transformer_options", {})[comfy_model.ATTENTION_OVERRIDE] = theirs
        seen.clear()
        outs[strategy] = ksample(m, positive, negative, steps=3)
        counts[strategy] = (len(seen), sum(seen))
        assert m.model_options["transformer_options"][comfy_model.ATTENTION_OVERRIDE] is theirs
    assert counts["per_block"][0] == counts["bias"][0], "another node's override runs for every attention call"
    assert counts["per_block"][1] == 0 and counts["bias"][1] > 0, "our bias is handed on as the attention's mask"
    assert not torch.allclose(outs["per_block"], outs["bias"])
