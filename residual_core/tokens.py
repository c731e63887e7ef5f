"""Find the identifier and class-word tokens of a concept in a prompt, for LAG.

`tokenize(text)` is the text encoder's tokenizer: it returns the prompt as chunks of token ids, each
chunk `[start, tokens..., end, padding...]` (77 ids for CLIP). Words are matched as id subsequences,
so multi-token words ("teddy bear"), several chunks, case and weight syntax ("(sks dog:1.2)") all
follow the tokenizer's own rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ResidualError

Tokenize = Callable[[str], list[list[int]]]


@dataclass(frozen=True)
class ConceptTokens:
    positions: list[int]  # absolute positions in the encoded prompt (chunk * chunk_len + offset)
    prompt_tokens: int  # total length of the encoded prompt


def _content(chunks: list[list[int]], end_id: int) -> list[tuple[int, int]]:
    """(absolute position, id) of every word token: after each chunk's start, before its end token."""
    out, offset = [], 0
    for chunk in chunks:
        for i, tok in enumerate(chunk[1:], start=1):
            if tok == end_id:
                break
            out.append((offset + i, tok))
        offset += len(chunk)
    return out


def _word_ids(tokenize: Tokenize, word: str, end_id: int) -> list[int]:
    return [tok for _, tok in _content(tokenize(word), end_id)]


def _occurrences(content: list[tuple[int, int]], ids: list[int]) -> list[list[int]]:
    seq = [tok for _, tok in content]
    n = len(ids)
    return [[content[i + j][0] for j in range(n)] for i in range(len(seq) - n + 1) if seq[i:i + n] == ids]


def locate_concept(tokenize: Tokenize, prompt: str, identifier: str, class_word: str) -> ConceptTokens:
    """Positions of the identifier and the class word in the encoded prompt.

    Every occurrence of the identifier counts. A class-word occurrence counts when it follows an
    identifier directly ("a sks dog next to a dog": the first dog only); when none does, all do.
    """
    for label, word in (("identifier", identifier), ("class word", class_word)):
        if not word.strip():
            raise ResidualError(f"The {label} is empty: set it to the word used in training (e.g. 'sks' and 'dog').")
    end_id = tokenize("")[0][1]
    chunks = tokenize(prompt)
    content = _content(chunks, end_id)
    found = {}
    for label, word in (("identifier", identifier), ("class word", class_word)):
        ids = _word_ids(tokenize, word, end_id)
        if not ids:
            raise ResidualError(f"The {label} {word!r} has no tokens; use a real word.")
        found[label] = _occurrences(content, ids)
        if not found[label]:
            raise ResidualError(
                f"The {label} {word!r} is not in the prompt {prompt!r}. Write the concept into the prompt "
                f"as '{identifier} {class_word}' (e.g. 'a photo of a {identifier} {class_word} on the beach')."
            )
    ident_ends = {occ[-1] for occ in found["identifier"]}
    after_ident = [occ for occ in found["class word"] if occ[0] - 1 in ident_ends]
    positions = [p for occ in found["identifier"] + (after_ident or found["class word"]) for p in occ]
    return ConceptTokens(sorted(set(positions)), sum(len(c) for c in chunks))
