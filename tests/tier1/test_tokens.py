import re

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


# ---------------------------------------------------------------- T5's framing (Flux's context)

class PieceTokenizer:
    """T5-XXL's framing as ComfyUI gives it: no start token, the pieces, the end token "</s>" (1), then pad 0 up
    to MIN, in one chunk however long the prompt. Sentencepiece-like pieces: case-sensitive; a space-separated
    word opens with "▁" (a piece of its own before a word outside the vocabulary, which splits into letters:
    "sks" -> ▁ s k s; a known word opening a longer one is its first piece: "dogfish" -> ▁dog f i s h);
    punctuation is its own piece, and a word glued after it gets no "▁" ("sks-dog" -> ... - dog); weight
    syntax dropped, each weighted part opening a word. `pieces` names ids, as the pack's tokenizer of a
    ComfyUI CLIP does."""

    END, PAD, MIN = 1, 0, 16

    def __init__(self, words=("a", "photo", "of", "dog", "on", "the", "beach", "next", "to", "teddy", "bear")):
        self.known, self.vocab = set(words), {"<pad>": self.PAD, "</s>": self.END}

    def _word(self, word: str) -> list[str]:
        out = []
        for run in re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9]", word):
            opens = "▁" if not out else ""
            head = max((w for w in self.known if run.startswith(w)), key=len, default="")
            if head:  # a known word, or one it opens ("dogfish" -> ▁dog f i s h)
                out += [opens + head, *run[len(head):]]
            elif run.isalnum():
                out += [opens] * bool(opens) + list(run)
            else:
                out.append(opens + run)
        return out

    def __call__(self, text: str) -> list[list[int]]:
        text = re.sub(r":[0-9.]+\)", " ", text).replace("(", " ").replace(")", " ")
        pieces = [p for word in text.split() for p in self._word(word)]
        ids = [self.vocab.setdefault(p, len(self.vocab)) for p in pieces] + [self.END]
        return [ids + [self.PAD] * (self.MIN - len(ids))]

    def pieces(self, ids: list[int]) -> list[str]:
        names = {i: p for p, i in self.vocab.items()}
        return [names[i] for i in ids]


def _pieces_at(tok: PieceTokenizer, prompt: str, positions: list[int]) -> list[str]:
    chunk = tok(prompt)[0]
    return tok.pieces([chunk[p] for p in positions])


def test_t5_positions_index_the_context_without_a_start_token():
    tok = PieceTokenizer()
    found = locate_concept(tok, "a photo of a sks dog on the beach", "sks", "dog")
    assert found.positions == [4, 5, 6, 7, 8] and found.prompt_tokens == PieceTokenizer.MIN  # ▁a ▁photo ▁of ▁a first
    assert _pieces_at(tok, "a photo of a sks dog on the beach", found.positions) == ["▁", "s", "k", "s", "▁dog"]


def test_t5_one_chunk_longer_than_its_minimum():
    tok = PieceTokenizer()
    prompt = "a photo of " + "a " * 30 + "sks dog"
    found = locate_concept(tok, prompt, "sks", "dog")
    assert found.prompt_tokens == 3 + 30 + 5 + 1  # no padding past the end token
    assert found.positions == [33, 34, 35, 36, 37]


def test_t5_punctuation_after_words_weights_and_the_class_word_rule():
    tok = PieceTokenizer()
    plain = locate_concept(tok, "a photo of sks dog next to a dog", "sks", "dog")
    assert plain.positions == [3, 4, 5, 6, 7]  # the second dog does not count
    weighted = locate_concept(tok, "a photo of (sks dog:1.2), next to a dog.", "sks", "dog")
    assert weighted.positions == plain.positions
    glued = locate_concept(tok, "a photo of sks, a dog.", "sks", "dog")  # none follows sks: every dog counts
    assert _pieces_at(tok, "a photo of sks, a dog.", glued.positions) == ["▁", "s", "k", "s", "▁dog"]
    bear = locate_concept(tok, "a sks teddy bear on the beach", "sks", "teddy bear")
    assert bear.positions == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("prompt,label,written,there", [
    ("a photo of SKS dog", "identifier 'sks'", "SKS", "['▁', 'S', 'K', 'S']"),
    ("a photo of (SKS dog:1.2)", "identifier 'sks'", "SKS", "['▁', 'S', 'K', 'S']"),
    ("a photo of a,sks dog", "identifier 'sks'", "a,sks", "['▁a', ',', 's', 'k', 's']"),
    ("a photo of sks-dog", "class word 'dog'", "sks-dog", "['▁', 's', 'k', 's', '-', 'dog']"),
])
def test_t5_a_word_split_differently_in_the_prompt_is_named_with_its_pieces(prompt, label, written, there):
    with pytest.raises(ResidualError) as e:
        locate_concept(PieceTokenizer(), prompt, "sks", "dog")
    message = str(e.value)
    assert f"The {label} is in the prompt as {written!r}" in message
    assert f"{written!r} -> {there}" in message
    alone = "['▁', 's', 'k', 's']" if "identifier" in label else "['▁dog']"
    assert f"alone -> {alone}" in message and "'▁' opens a word" in message
    assert "Write it into the prompt exactly as" in message and "with a space before it" in message


def test_t5_missing_and_untokenizable_words():
    tok = PieceTokenizer()
    with pytest.raises(ResidualError, match="'dog' is not in the prompt"):
        locate_concept(tok, "a photo of sks on the beach", "sks", "dog")
    with pytest.raises(ResidualError, match="'dog' is not in the prompt"):
        locate_concept(tok, "a photo of sks hotdog", "sks", "dog")  # inside another word: not the word
    # The word's pieces opening a longer word (no end-of-word mark in sentencepiece, unlike CLIP's "</w>")
    assert tok.pieces(tok("a sksy dogfish")[0][:7]) == ["▁a", "▁", "s", "k", "s", "y", "▁dog"]
    with pytest.raises(ResidualError, match="'sks' is not in the prompt"):
        locate_concept(tok, "a photo of sksy dog", "sks", "dog")
    with pytest.raises(ResidualError, match="'dog' is not in the prompt"):
        locate_concept(tok, "a photo of sks dogfish", "sks", "dog")
    assert locate_concept(tok, "a sks dog's toy", "sks", "dog").positions == [1, 2, 3, 4, 5]  # "'": a new piece
    with pytest.raises(ResidualError, match="'sks' is not in the prompt"):
        locate_concept(tok, "", "sks", "dog")

