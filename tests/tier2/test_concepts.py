"""Several concepts in one image: a chain of LAG Sampler nodes, each residual gated by its own words."""

import pytest
import torch
from comfy_env import concept_residual, counted_encodes, ksample, run, spy_sampling, weights_hash
from personalized_residuals.nodes.lag import PATCH_KEY, LagMaskPreview, LagSampler
from personalized_residuals.residual_core import ResidualError, lag

import nodes as comfy_nodes

PROMPT = "a photo of a sks dog and a zwx cat in a garden"


def _concept(model, identifier, class_word, seed):
    residual = concept_residual(model, seed)
    residual.meta.identifier, residual.meta.class_word = identifier, class_word
    return residual


def _chain(model, clip, prompts, **kw):
    args = {"strength": 1.0, "mode": "LAG", "mask_rule": "soft", "mask_value": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, **kw}
    m, positive = model, None
    for (ident, cls, seed), prompt in zip([("sks", "dog", 1), ("zwx", "cat", 2)], prompts, strict=True):
        m, positive = run(LagSampler, m, _concept(model, ident, cls, seed), clip, prompt, **args)
    return m, positive


@pytest.fixture
def negative(clip):
    return comfy_nodes.CLIPTextEncode().encode(clip, "")[0]


def test_a_chain_applies_each_concept_inside_its_own_mask_in_one_pass(sd15, clip, negative, monkeypatch):
    before = weights_hash(sd15)
    m, positive = _chain(sd15, clip, ["a sks dog", PROMPT])
    patch = m.get_attachment(PATCH_KEY)
    assert [c.name for c in patch.concepts] == ["sks dog", "zwx cat"]
    # The first node's prompt named only its own concept; the chain locates it again in the last prompt
    # ('zwx' is two BPE tokens).
    assert patch.sessions[0].positions == [5, 6] and patch.sessions[1].positions == [9, 10, 11]
    spy = spy_sampling(monkeypatch)
    out = ksample(m, positive, negative)
    assert len(spy.evaluations) == 3, "one model evaluation per step, whatever the number of concepts"
    assert all(s.mean_masks() for s in patch.sessions) and torch.isfinite(out).all()
    pairs = [(a.mask, b.mask) for a, b in spy.pairs()]
    assert len(pairs) == 3 * 16 and any(float(a.sum()) > 0 and float(b.sum()) > 0 for a, b in pairs)
    assert all(float((a * b).max()) == 0 for a, b in pairs), "where both attend, one wins: masks never overlap"
    preview = run(LagMaskPreview, m, {"samples": out})[0]
    assert preview.shape == (1, 64, 64, 3) and float(preview[..., 0].max()) > 0 and float(preview[..., 2].max()) > 0
    assert weights_hash(sd15) == before


def test_a_chain_runs_the_text_encoder_once_and_again_only_when_the_prompt_or_clip_changes(sd15, clip, monkeypatch):
    counting, calls = counted_encodes(clip, monkeypatch)
    _, positive = _chain(sd15, counting, [PROMPT, PROMPT])
    assert len(calls) == 1, "two LAG nodes on one CLIP and prompt: one encoding"
    assert torch.equal(positive[0][0], clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))[0][0])
    _chain(sd15, counting, ["a sks dog", PROMPT])
    assert len(calls) == 2, "another prompt is encoded; the chain's was kept"
    counting.clip_layer(-2)  # what CLIPSetLastLayer does to its clone
    _, penultimate = _chain(sd15, counting, [PROMPT, PROMPT])
    assert len(calls) == 3 and not torch.equal(penultimate[0][0], positive[0][0])
    counting.set_tokenizer_option("clip_l_min_padding", 0)  # what T5TokenizerOptions does to its clone
    _chain(sd15, counting, [PROMPT, PROMPT])
    assert len(calls) == 4
    name, weight = next(iter(counting.patcher.model_state_dict().items()))
    counting.add_patches({name: (torch.zeros_like(weight),)})  # what a LoRA loader does to its clone
    _chain(sd15, counting, [PROMPT, PROMPT])
    assert len(calls) == 5


def test_a_chain_whose_last_prompt_lacks_a_concept_says_which(sd15, clip):
    with pytest.raises(ResidualError, match="Concept 'sks dog' of this LAG chain.*must name every concept"):
        _chain(sd15, clip, ["a sks dog", "a photo of a zwx cat"])


def test_the_second_concept_changes_the_image_only_where_its_mask_is(sd15, clip, negative, monkeypatch):
    m, positive = _chain(sd15, clip, [PROMPT, PROMPT])
    alone = run(LagSampler, sd15, _concept(sd15, "sks", "dog", 1), clip, PROMPT, 1.0, "LAG", "soft", 1.0, 0.0, 1.0)[0]
    zwx = m.get_attachment(PATCH_KEY).sessions[1]
    both = ksample(m, positive, negative)
    # With the second concept's mask emptied, the chain gives the first concept alone.
    original = lag.LagSession.weights

    def empty_second(self, *a):
        mask, score = original(self, *a)
        return (mask * 0, score) if self is zwx else (mask, score)

    monkeypatch.setattr(lag.LagSession, "weights", empty_second)
    assert torch.equal(ksample(m, positive, negative), ksample(alone, positive, negative))
    assert not torch.equal(both, ksample(alone, positive, negative))
