"""Token positions on Flux's CLIP: its T5-XXL tokens, whose encoding is the DiT's context (build_flux_clip: the
real FluxTokenizer, both encoders tiny and random through ComfyUI's own FluxClipModel)."""

import pytest
import torch
from comfy_env import SDXLTextStandIn, build_clip
from comfyui_models import build_flux_clip
from personalized_residuals.nodes.comfy_model import context_key, tokenizer_of
from personalized_residuals.residual_core import ResidualError, locate_concept

PROMPT = "a photo of sks dog"
T5_MIN = 256  # comfy.text_encoders.flux.T5XXLTokenizer's min_length: a short prompt's T5 tokens, padded


@pytest.fixture(scope="module")
def flux_clip():
    return build_flux_clip()


def encode(clip, prompt):
    with torch.inference_mode():
        cond, extra = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0]
    return cond[0], extra


def test_flux_conditioning_is_the_t5_context_and_clip_l_pooled(flux_clip):
    tokens = flux_clip.tokenize(PROMPT)
    assert set(tokens) == {"l", "t5xxl"} and context_key(tokens) == "t5xxl"
    assert [len(c) for c in tokens["t5xxl"]] == [T5_MIN] and [len(c) for c in tokens["l"]] == [77]
    context, extra = encode(flux_clip, PROMPT)
    assert context.shape == (T5_MIN, 32) and extra["pooled_output"].shape == (1, 32)  # build_flux's defaults
    long = flux_clip.tokenize("a photo of a " + "very " * 300 + "sks dog")
    assert [len(c) for c in long["t5xxl"]] == [312] and len(long["l"]) == 5  # T5: one chunk, however long


def test_the_tokenizer_of_a_flux_clip_is_t5s(flux_clip):
    tokenize = tokenizer_of(flux_clip)
    ids = [t[0] for t in flux_clip.tokenize(PROMPT)["t5xxl"][0]]
    assert tokenize(PROMPT) == [ids]
    assert tokenize.pieces(ids[:11]) == ["▁", "a", "▁photo", "▁of", "▁", "s", "k", "s", "▁dog", "</s>", "<pad>"]
    assert set(ids[10:]) == {0}


def test_positions_point_at_the_t5_tokens_of_sks_and_dog_in_the_context(flux_clip):
    tokenize = tokenizer_of(flux_clip)
    found = locate_concept(tokenize, PROMPT, "sks", "dog")
    context, _ = encode(flux_clip, PROMPT)
    assert found.prompt_tokens == context.shape[0] == T5_MIN
    assert found.positions == [4, 5, 6, 7, 8]
    assert tokenize.pieces([tokenize(PROMPT)[0][p] for p in found.positions]) == ["▁", "s", "k", "s", "▁dog"]
    assert tokenize.pieces(tokenize("sks")[0][:4]) == ["▁", "s", "k", "s"]  # the identifier alone: the same pieces

    # Another class word changes its own context row by its embedding; T5 attends both ways (no causal mask,
    # no padding mask in Flux), so every other row, earlier ones and padding too, moves, but far less.
    other, _ = encode(flux_clip, "a photo of sks cat")
    assert tokenize("a photo of sks cat")[0][:8] == tokenize(PROMPT)[0][:8]
    moved = (context - other).norm(dim=-1)
    rest = torch.cat([moved[:8], moved[9:]])
    assert moved[8] > 100 * rest.max() and rest[:8].min() > 0


def test_a_trigger_word_t5_splits_differently_is_refused_by_name(flux_clip):
    tokenize = tokenizer_of(flux_clip)
    with pytest.raises(ResidualError) as e:
        locate_concept(tokenize, "a photo of SKS dog", "sks", "dog")
    assert ("The identifier 'sks' is in the prompt as 'SKS'" in str(e.value)
            and "'SKS' -> ['▁S', 'KS'], 'sks' alone -> ['▁', 's', 'k', 's']" in str(e.value)
            and "exactly as 'sks' (same case" in str(e.value))
    with pytest.raises(ResidualError, match=r"'dog' is in the prompt as 'sks-dog'.*'sks-dog' -> "
                                            r"\['▁', 's', 'k', 's', '-', 'dog'\], 'dog' alone -> \['▁dog'\]"):
        locate_concept(tokenize, "a photo of sks-dog", "sks", "dog")
    # T5's pieces have no end-of-word mark: "dog" opens "dogfish" (▁dog fish), "sks" opens "sksy" (▁ s k s y)
    for prompt, word in (("a photo of sks dogfish", "dog"), ("a photo of sksy dog", "sks")):
        with pytest.raises(ResidualError, match=f"'{word}' is not in the prompt"):
            locate_concept(tokenize, prompt, "sks", "dog")
    # punctuation after a word and weight syntax keep T5's pieces: found where the plain prompt has them
    for prompt in ("a photo of sks, dog", "a photo of (sks dog:1.2), on grass"):
        assert locate_concept(tokenize, prompt, "sks", "dog").positions[:4] == [4, 5, 6, 7]


def test_sd_clips_keep_the_clip_l_tokens():
    sd1, sdxl = build_clip("sd1"), SDXLTextStandIn()
    for clip in (sd1, sdxl):
        tokens = clip.tokenize(PROMPT)
        assert context_key(tokens) == "l" and tokenizer_of(clip)(PROMPT) == [[t[0] for t in c] for c in tokens["l"]]
        assert locate_concept(tokenizer_of(clip), "a photo of a sks dog", "sks", "dog").positions == [5, 6]
    assert context_key(build_clip("sd2").tokenize(PROMPT)) == "h"
    assert tokenizer_of(sd1).pieces(tokenizer_of(sd1)("sks dog")[0][:4]) == [
        "<|startoftext|>", "sks</w>", "dog</w>", "<|endoftext|>"]


def test_the_dit_gets_the_whole_t5_context_the_positions_index(flux_clip):
    """Sampled as ComfyUI samples Flux: the DiT's text input (txt_in's) is the T5 context, every row, padding kept."""
    from comfyui_models import build_flux

    import nodes as comfy_nodes

    flux, seen = build_flux(), []
    positive = flux_clip.encode_from_tokens_scheduled(flux_clip.tokenize(PROMPT))
    negative = flux_clip.encode_from_tokens_scheduled(flux_clip.tokenize(""))
    txt_in = flux.model.diffusion_model.txt_in
    hook = txt_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.inference_mode():
            comfy_nodes.common_ksampler(flux, 0, 1, 1.0, "euler", "normal", positive, negative,
                                        {"samples": torch.zeros(1, 16, 8, 8)})
    finally:
        hook.remove()
    found = locate_concept(tokenizer_of(flux_clip), PROMPT, "sks", "dog")
    context, _ = encode(flux_clip, PROMPT)
    assert seen and seen[0].shape == (1, found.prompt_tokens, 32)
    torch.testing.assert_close(seen[0][0].float(), context, rtol=1e-3, atol=1e-3)
