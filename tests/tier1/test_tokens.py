import pytest
from helpers import CHUNK, WordTokenizer
from personalized_residuals.residual_core import ResidualError, locate_concept
from personalized_residuals.residual_core.words import identifier_warnings


def test_identifier_and_class_word_positions():
    found = locate_concept(WordTokenizer(), "a photo of a sks dog on the beach", "sks", "dog")
    assert found.positions == [5, 6] and found.prompt_tokens == CHUNK


def test_multi_token_class_word_case_and_weight_syntax():
    tok = WordTokenizer(multi={"teddybear": ["teddy", "bear"]})
    found = locate_concept(tok, "A photo of (SKS TeddyBear:1.2) in snow", "sks", "teddybear")
    assert found.positions == [4, 5, 6]


def test_class_word_after_the_identifier_wins_over_other_occurrences():
    tok = WordTokenizer()
    assert locate_concept(tok, "a sks dog next to a dog", "sks", "dog").positions == [2, 3]
    assert locate_concept(tok, "a dog and sks", "sks", "dog").positions == [2, 4]  # none follows: all count


def test_positions_in_a_later_chunk_are_absolute():
    prompt = " ".join(["word"] * 80) + " a sks dog"
    found = locate_concept(WordTokenizer(), prompt, "sks", "dog")
    assert found.prompt_tokens == 2 * CHUNK
    assert found.positions == [CHUNK + 1 + 6, CHUNK + 1 + 7]  # 5 'word's then 'a' precede in chunk 2


@pytest.mark.parametrize("prompt,word", [("a photo of a sks cat", "'dog'"), ("a photo of a dog", "'sks'")])
def test_a_word_missing_from_the_prompt_is_named(prompt, word):
    with pytest.raises(ResidualError, match=f"{word} is not in the prompt"):
        locate_concept(WordTokenizer(), prompt, "sks", "dog")


def test_empty_or_untokenizable_words_are_refused():
    with pytest.raises(ResidualError, match="class word is empty"):
        locate_concept(WordTokenizer(), "a sks dog", "sks", "  ")
    with pytest.raises(ResidualError, match="has no tokens"):
        locate_concept(WordTokenizer(), "a sks dog", "sks", "!!")


@pytest.mark.parametrize("identifier,class_word,expected", [
    ("sks", "dog", []),
    ("zwx", "guitar amplifier", []),
    ("photo", "dog", ["'photo' is a common word"]),
    ("Red sks", "car", ["'red' is a common word"]),
    ("xqz", "xqz", ["is the class word itself"]),
    ("dog", "Dog", ["'dog' is a common word", "is the class word itself"]),
])
def test_common_word_identifiers_are_warned_about(identifier, class_word, expected):
    lines = identifier_warnings(identifier, class_word)
    assert len(lines) == len(expected)
    for line, part in zip(lines, expected, strict=True):
        assert part in line and "Pick a rare token" in line
