"""LAG inside ComfyUI's real sampling path: invariants, chaining with other patches, every sampler entry."""

import comfy.samplers
import pytest
import torch
from comfy_env import concept_residual, ksample, run, stock_lora, weights_hash
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
from personalized_residuals.nodes.comfy_model import targets_of
from personalized_residuals.nodes.lag import LagSampler
from personalized_residuals.residual_core import lag

import nodes as comfy_nodes

PROMPT = "a photo of a sks dog on the beach"


def _lag(model, residual, clip, mode="LAG", **kw):
    args = {"strength": 1.0, "mask_rule": "max_fraction", "mask_value": 0.5, "start_percent": 0.0,
            "end_percent": 1.0, **kw}
    return run(LagSampler, model, residual, clip, PROMPT, mode=mode, **args)


@pytest.fixture
def negative(clip):
    return comfy_nodes.CLIPTextEncode().encode(clip, "")[0]


def test_mask_of_ones_is_the_stock_lora_and_zeros_the_base_exactly(sd15, clip, negative, tmp_path, monkeypatch):
    residual = concept_residual(sd15)
    base = ksample(sd15, *_lag(sd15, residual, clip, strength=0.0)[1:], negative)
    m, positive = _lag(sd15, residual, clip)
    stock = ksample(stock_lora(sd15, residual, tmp_path), positive, negative)
    monkeypatch.setattr(lag, "threshold", lambda a, rule, value: torch.ones_like(a))
    ones = ksample(m, positive, negative)
    monkeypatch.setattr(lag, "threshold", lambda a, rule, value: torch.zeros_like(a))
    zeros = ksample(m, positive, negative)
    plain = ksample(sd15, positive, negative)
    assert torch.equal(zeros, plain) and torch.equal(base, plain)
    assert (stock - plain).abs().max() > 1e-2, "the residual must matter for this test to mean anything"
    # Merged weights compute (W + dW) x, the hooks W x + dW x: equal up to float32 rounding, which scales with
    # the size of the values (up to ~200 after three steps of this random model), not with each element.
    scale = float(stock.abs().max())
    assert float((ones - stock).abs().max()) <= 1e-5 * scale
    global_ = ksample(_lag(sd15, residual, clip, mode="global")[0], positive, negative)
    assert float((global_ - stock).abs().max()) <= 1e-5 * scale


def test_unconditional_rows_reuse_the_mask_of_the_conditional_rows(sd15, clip, negative, monkeypatch):
    m, positive = _lag(sd15, concept_residual(sd15), clip, mask_rule="soft", mask_value=1.0)
    calls = []
    original = lag.LagSession.applied

    def spy(self, block, grid, mask, score):
        calls.append((list(self.call.layout.cond_or_uncond), mask.clone()))
        return original(self, block, grid, mask, score)

    monkeypatch.setattr(lag.LagSession, "applied", spy)
    ksample(m, positive, negative, batch=2)
    mixed = [mask for chunks, mask in calls if sorted(chunks) == [0, 1]]
    assert mixed, "ComfyUI batched cond and uncond rows together"
    for mask in mixed:
        rows = mask.shape[0] // 2
        assert torch.equal(mask[:rows], mask[rows:])
    assert any(not torch.equal(mask[0], mask[1]) for mask in mixed), "each sample of the batch has its own mask"


@pytest.mark.parametrize("family", ["sd2_v", "sdxl"])
def test_linear_proj_out_families_record_a_mask_in_every_block(family, request, clip_sd2, clip_sdxl):
    model = request.getfixturevalue(family)
    clip = clip_sd2 if family == "sd2_v" else clip_sdxl
    m, positive = _lag(model, concept_residual(model), clip)
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    before = weights_hash(model)
    out = ksample(m, positive, negative)
    masks = m.get_attachment("personalized_residuals.lag").sessions[0].mean_masks()
    assert len(masks) == len(targets_of(model)) and torch.isfinite(out).all()
    assert not torch.equal(out, ksample(model, positive, negative))
    assert weights_hash(model) == before


def test_a_stock_lora_on_the_same_proj_out_still_applies(sd15, clip, negative, tmp_path, monkeypatch):
    lora_model = stock_lora(sd15, concept_residual(sd15, seed=9), tmp_path, "other.safetensors")
    monkeypatch.setattr(lag, "threshold", lambda a, rule, value: torch.zeros_like(a))
    m, positive = _lag(lora_model, concept_residual(sd15), clip)
    assert torch.equal(ksample(m, positive, negative), ksample(lora_model, positive, negative))
    assert not torch.equal(ksample(m, positive, negative), ksample(sd15, positive, negative))


def test_an_earlier_attn2_replace_patch_still_runs(sd15, clip, negative):
    from comfy.ldm.modules.attention import optimized_attention

    calls = []

    def replace(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"])

    patched = sd15.clone()
    patched.set_model_attn2_replace(replace, "input", 1)
    m, positive = _lag(patched, concept_residual(sd15), clip)
    out = ksample(m, positive, negative)
    assert calls and set(calls) == {("input", 1)}
    assert torch.equal(out, ksample(_lag(sd15, concept_residual(sd15), clip)[0], positive, negative))


def test_ksampler_advanced_and_sampler_custom_advanced_work_and_the_base_stays_bit_identical(sd15, clip, negative):
    before = weights_hash(sd15)
    m, positive = _lag(sd15, concept_residual(sd15), clip)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    adv = comfy_nodes.KSamplerAdvanced().sample(m, "enable", 0, 4, 4.0, "euler", "normal", positive, negative, latent,
                                                 1, 3, "disable")[0]["samples"]
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(positive, negative)
    guider.set_cfg(4.0)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "normal", 3)
    custom = SamplerCustomAdvanced().sample(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"),
                                            sigmas, latent)[0]["samples"]
    assert torch.isfinite(adv).all() and torch.isfinite(custom).all()
    assert torch.allclose(custom, ksample(m, positive, negative), atol=1e-5), "same sampling, same result"
    assert m.get_attachment("personalized_residuals.lag").sessions[0].mean_masks()
    assert weights_hash(sd15) == before


def test_start_and_end_percent_gate_theconcept_residual(sd15, clip, negative):
    residual = concept_residual(sd15)
    full, positive = _lag(sd15, residual, clip)
    sampling = sd15.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 3)[:-1]  # the 3 steps' sigmas
    between = _lag(sd15, residual, clip, start_percent=0.9, end_percent=0.95)[0]
    assert not any(sampling.percent_to_sigma(0.95) <= s <= sampling.percent_to_sigma(0.9) for s in sigmas.tolist())
    first = _lag(sd15, residual, clip, start_percent=0.0, end_percent=0.01)[0]
    plain, full = ksample(sd15, positive, negative), ksample(full, positive, negative)
    assert torch.equal(ksample(between, positive, negative), plain), "no step in the window: the base model"
    first = ksample(first, positive, negative)
    assert not torch.equal(first, plain) and not torch.equal(first, full), "only the first step in the window"
