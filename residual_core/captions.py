"""Per-photo captions: which prompt each photo trains with.

Captions come as one text with a caption per line (typed into the node), or as one string per photo (what
an image-and-text dataset loader gives, one per image file). Each must name the concept as the training
prompt does, identifier and class word, found by the same token search as LAG's (locate_concept), so the
residual is tied to those words in every photo. Distinct captions are encoded once each; at each step the
batch's rows are grouped by caption, one denoiser call per group (PhotoPrompts.denoiser).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ResidualError
from .tokens import Tokenize, locate_concept


@dataclass(frozen=True)
class PhotoPrompts:
    texts: list[str]  # the distinct prompts, in the order first used
    of_photo: list[int]  # photo i trains with texts[of_photo[i]]

    @classmethod
    def same(cls, prompt: str, photos: int) -> PhotoPrompts:
        """One prompt for every photo (no captions)."""
        return cls([prompt], [0] * photos)

    def denoiser(self, denoise: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]):
        """A training Denoiser (x_t, t, photo index) from denoise(x_t, t, k), which conditions every row it is
        given on texts[k]: rows are grouped by their photo's prompt, one call per group, and the outputs put
        back in row order. One prompt: a single call, as without captions."""
        if len(self.texts) == 1:
            return lambda x_t, t, index: denoise(x_t, t, 0)
        table = torch.tensor(self.of_photo)

        def run(x_t: torch.Tensor, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            which = table[index.cpu()]  # the host needs the groups: one small read per step
            groups = [(k, (which == k).nonzero().flatten()) for k in which.unique().tolist()]
            if len(groups) == 1:
                return denoise(x_t, t, groups[0][0])
            rows = [r.to(x_t.device) for _, r in groups]
            out = torch.cat([denoise(x_t[r], t[r], k) for (k, _), r in zip(groups, rows, strict=True)])
            return out[torch.argsort(torch.cat(rows))]

        return run


def _entries(captions: list[str]) -> list[tuple[str, str]]:
    """(where, caption) pairs: one text is split into lines (blank lines skipped, counted in the line
    numbers); several strings are one caption each."""
    if len(captions) == 1:
        lines = captions[0].splitlines()
        return [(f"line {n}", line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    return [(f"caption {n}", str(c).strip()) for n, c in enumerate(captions, start=1)]


def photo_prompts(captions: list[str] | None, photos: int, prompt: str, tokenize: Tokenize, identifier: str,
                  class_word: str) -> PhotoPrompts:
    """The prompt of each of `photos` photos: `prompt` for all when there are no captions (None, [] or blank
    text), else caption i for photo i. Raises a ResidualError naming the caption (line number) and the fix for
    a wrong count, an empty caption or one without the identifier and class word."""
    if not captions or (len(captions) == 1 and not str(captions[0]).strip()):
        return PhotoPrompts.same(prompt, photos)
    entries = _entries([str(c) for c in captions])
    empty = [where for where, text in entries if not text]
    if empty:
        raise ResidualError(f"captions: {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty. Every photo "
                            f"needs a caption naming the concept, e.g. '{prompt}' (a dataset loader gives an empty "
                            "caption for a photo without a .txt file).")
    if len(entries) != photos:
        kind = "lines" if len(captions) == 1 else "captions"
        raise ResidualError(f"captions: {len(entries)} {kind} for {photos} photo(s); give one caption per photo, in the "
                            "photos' order (one per line; blank lines are skipped).")
    for i, (where, text) in enumerate(entries, start=1):
        try:
            locate_concept(tokenize, text, identifier, class_word)
        except ResidualError as e:
            raise ResidualError(f"captions, {where} (photo {i}): {e}") from None
    texts = list(dict.fromkeys(text for _, text in entries))
    return PhotoPrompts(texts, [texts.index(text) for _, text in entries])
