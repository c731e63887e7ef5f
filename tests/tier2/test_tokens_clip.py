"""Token positions with ComfyUI's real CLIP tokenizers (BPE, weights syntax, 77-token chunks, SDXL l and g)."""

import comfy.sd1_clip
import comfy.sdxl_clip
import pytest
from personalized_residuals.nodes.comfy_model import tokenizer_of
from personalized_residuals.residual_core import ResidualError, locate_concept


class _Clip:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)


SD1 = tokenizer_of(_Clip(comfy.sd1_clip.SD1Tokenizer()))


def test_multi_token_class_word_weights_and_case():
    plain = locate_concept(SD1, "a photo of a sks teddybear", "sks", "teddybear")
    weighted = locate_concept(SD1, "a photo of a (SKS TeddyBear:1.3), in snow", "sks", "teddybear")
    assert len(plain.positions) >= 3, "teddybear is several BPE tokens"
    assert weighted.positions == plain.positions


def test_two_word_class_and_later_chunks():
    found = locate_concept(SD1, "a sks guitar amplifier on a stage", "sks", "guitar amplifier")
    assert found.positions == [2, 3, 4]
    long = "a photo of a " + "very " * 90 + "sks dog"
    found = locate_concept(SD1, long, "sks", "dog")
    assert found.prompt_tokens == 2 * 77 and min(found.positions) > 77


def test_missing_word_names_it():
    with pytest.raises(ResidualError, match="'sks' is not in the prompt"):
        locate_concept(SD1, "a photo of a dog", "sks", "dog")


def test_sdxl_encoders_share_positions():
    tokenizer = comfy.sdxl_clip.SDXLTokenizer()

    def side(name):
        def tokenize(text):
            return [[t[0] for t in chunk] for chunk in tokenizer.tokenize_with_weights(text)[name]]
        return tokenize

    prompt = "a (sks dog:1.2) and a cat on a " + "very " * 80 + "green lawn"
    assert locate_concept(side("l"), prompt, "sks", "dog") == locate_concept(side("g"), prompt, "sks", "dog")
