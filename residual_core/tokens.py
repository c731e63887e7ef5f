"""Find the identifier and class-word tokens of a concept in a prompt, for LAG.

`tokenize(text)` is the tokenizer of the text encoder whose output is the model's cross-attention context: it
returns the prompt as chunks of token ids, which the encoded prompt holds one after another. A chunk is
`[start] tokens... end padding...`; the framing is read off the tokenizer itself (see `_framing`):
- CLIP (SD1.x, SD2.x, SDXL): a start token, 77 ids a chunk, as many chunks as the prompt needs;
- T5 (Flux's context): no start token, sentencepiece pieces ("▁" opens a word, often as a piece of its own:
  "sks" -> ▁ s k s), end token "</s>" (id 1), then pad id 0 up to a minimum length (256 in Flux), one chunk.
Words are matched as id subsequences, so multi-token words ("teddy bear"), several chunks, case and weight
syntax ("(sks dog:1.2)") all follow the tokenizer's own rules.

A tokenizer may carry `pieces(ids) -> list[str]` (its vocabulary's strings), which error messages use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ResidualError

Tokenize = Callable[[str], list[list[int]]]


@dataclass(frozen=True)
class ConceptTokens:
    positions: list[int]  # absolute positions in the encoded prompt (chunk * chunk_len + offset)
    prompt_tokens: int  # total length of the encoded prompt


@dataclass(frozen=True)
class _Framing:
    start: int  # special tokens opening each chunk: CLIP 1, T5 0
    end_id: int  # the token closing a chunk's words


def _framing(empty: list[int], texts: list[list[int]]) -> _Framing:
    """The empty prompt's chunk is `[start] end padding...`. Against the first chunk of a text with tokens:
    CLIP's chunks all open with the same id (its start token), T5's with the text's first piece."""
    first = next((t for t in texts if t != empty), None)
    if first is None:  # no text has tokens: every word search comes back empty
        return _Framing(0, empty[0])
    start = 1 if first[0] == empty[0] else 0
    return _Framing(start, empty[start])


def _content(chunks: list[list[int]], framing: _Framing) -> list[tuple[int, int]]:
    """(absolute position, id) of every word token: after each chunk's start, before its end token."""
    out, offset = [], 0
    for chunk in chunks:
        for i, tok in enumerate(chunk[framing.start:], start=framing.start):
            if tok == framing.end_id:
                break
            out.append((offset + i, tok))
        offset += len(chunk)
    return out


def _continues_word(tokenize: Tokenize, ids: list[int]) -> Callable[[int], bool]:
    """Whether a token after the word's ids goes on with it rather than opening the next word. Sentencepiece
    pieces ("▁" opens a word) say so: a piece opening with a letter or a digit goes on ("sksy" -> ▁ s k s y;
    "dogfish" -> ▁dog fish), punctuation and "▁..." do not. CLIP's BPE marks a word's end in its last token
    ("dog</w>"), so nothing follows; tokenizers without `pieces` are taken as such."""
    pieces = getattr(tokenize, "pieces", None)
    if pieces is None or not pieces(ids[:1])[0].startswith("▁"):
        return lambda tok: False
    return lambda tok: pieces([tok])[0][:1].isalnum()


def _occurrences(content: list[tuple[int, int]], ids: list[int], continues: Callable[[int], bool]) -> list[list[int]]:
    """Every run of `ids` in the content that ends a word, as its positions."""
    seq = [tok for _, tok in content]
    n = len(ids)
    return [[content[i + j][0] for j in range(n)] for i in range(len(seq) - n + 1)
            if seq[i:i + n] == ids and not (i + n < len(seq) and continues(seq[i + n]))]


def _written(prompt: str, word: str) -> str | None:
    """How the prompt writes `word` as a word of its own (any case, set off by anything but a letter or a
    digit): the whole run of non-space text around it, weight syntax dropped ("(SKS" -> "SKS", "sks-dog");
    None when the prompt does not."""
    pattern = r"(?<![^\W_])" + r"\s+".join(re.escape(p) for p in word.split()) + r"(?![^\W_])"
    m = re.search(pattern, prompt, re.IGNORECASE)
    if m is None:
        return None
    start, end = m.start(), m.end()
    while start > 0 and not prompt[start - 1].isspace():
        start -= 1
    while end < len(prompt) and not prompt[end].isspace():
        end += 1
    return re.sub(r":[0-9.]+\)|[()]", "", prompt[start:end]) or prompt[m.start():m.end()]


def _split_differently(tokenize: Tokenize, framing: _Framing, label: str, word: str, written: str,
                       ids: list[int], example: str) -> ResidualError:
    pieces = getattr(tokenize, "pieces", None)

    def shown(token_ids: list[int]) -> str:
        return str(pieces(token_ids) if pieces is not None else token_ids)

    there, alone = shown([t for _, t in _content(tokenize(written), framing)]), shown(ids)
    marks = " ('▁' opens a word)" if "▁" in there + alone else ""
    return ResidualError(
        f"The {label} {word!r} is in the prompt as {written!r}, but the text encoder's tokenizer splits it "
        f"differently there: {written!r} -> {there}, {word!r} alone -> {alone}{marks}, so its tokens are not found. "
        f"Write it into the prompt exactly as {word!r} (same case: T5's tokenizer is case-sensitive), as a word of its own "
        f"with a space before it, e.g. {example!r}."
    )


def locate_concept(tokenize: Tokenize, prompt: str, identifier: str, class_word: str) -> ConceptTokens:
    """Positions of the identifier and the class word in the encoded prompt.

    Every occurrence of the identifier counts. A class-word occurrence counts when it follows an
    identifier directly ("a sks dog next to a dog": the first dog only); when none does, all do. A word the
    prompt holds but whose tokens there differ from the word's own (T5: "SKS" for "sks", "sks-dog" for "dog")
    is refused by name, with what the tokenizer made of it.
    """
    words = {"identifier": identifier, "class word": class_word}
    for label, word in words.items():
        if not word.strip():
            raise ResidualError(f"The {label} is empty: set it to the word used in training (e.g. 'sks' and 'dog').")
    word_chunks = {label: tokenize(word) for label, word in words.items()}
    framing = _framing(tokenize("")[0], [chunks[0] for chunks in word_chunks.values()])
    chunks = tokenize(prompt)
    content = _content(chunks, framing)
    example = f"a photo of a {identifier} {class_word} on the beach"
    found = {}
    for label, word in words.items():
        ids = [tok for _, tok in _content(word_chunks[label], framing)]
        if not ids:
            raise ResidualError(f"The {label} {word!r} has no tokens; use a real word.")
        found[label] = _occurrences(content, ids, _continues_word(tokenize, ids))
        if not found[label]:
            written = _written(prompt, word)
            if written is not None:
                raise _split_differently(tokenize, framing, label, word, written, ids, example)
            raise ResidualError(
                f"The {label} {word!r} is not in the prompt {prompt!r}. Write the concept into the prompt "
                f"as '{identifier} {class_word}' (e.g. '{example}')."
            )
    ident_ends = {occ[-1] for occ in found["identifier"]}
    after_ident = [occ for occ in found["class word"] if occ[0] - 1 in ident_ends]
    positions = [p for occ in found["identifier"] + (after_ident or found["class word"]) for p in occ]
    return ConceptTokens(sorted(set(positions)), sum(len(c) for c in chunks))
