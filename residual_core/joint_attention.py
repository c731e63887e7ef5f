"""LAG's map on a DiT with joint attention (Flux): where the concept's text tokens are attended from.

In Flux's double and single blocks the text and image tokens attend jointly, text first: q and k are
[batch, heads, text + image tokens, head_dim], after RoPE. The counterpart of SD's cross-attention map is the
image-query x text-key block, renormalised over the text tokens (so the image tokens' attention to each
other, most of the mass, does not dilute it), summed over the concept's token columns and averaged over
heads. Image tokens are 2x2 latent patches, in row-major order over the patch grid.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .errors import ResidualError


def text_attention(q: torch.Tensor, k: torch.Tensor, text_tokens: int, columns: torch.Tensor,
                   heads_at_once: int = 4) -> torch.Tensor:
    """q, k [batch, heads, text + image, d] -> [batch, image] in float32: per image token, the softmax over the
    text keys only, summed over `columns` (indices into the text tokens), mean over heads. Heads are taken
    `heads_at_once` at a time: the image x text logits of all 24 heads of Flux at 1024 px would be 200 MB."""
    b, heads, tokens, d = q.shape
    if not 0 < text_tokens < tokens or k.shape[:3] != q.shape[:3]:
        raise ResidualError(f"joint attention: {text_tokens} text tokens out of q {list(q.shape)}, k {list(k.shape)}.")
    total = torch.zeros(b, tokens - text_tokens, dtype=torch.float32, device=q.device)
    for h in range(0, heads, heads_at_once):
        image_q = q[:, h:h + heads_at_once, text_tokens:]
        text_k = k[:, h:h + heads_at_once, :text_tokens] * d**-0.5
        probs = (image_q @ text_k.transpose(-1, -2)).softmax(-1, dtype=torch.float32)
        total += probs.index_select(-1, columns).sum(-1).sum(1)
    return total / heads


def patch_grid(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[batch, image tokens] over 2x2 patches -> [batch, height, width] on the latent's own grid (each patch's
    value on its four latent pixels); height and width of the latent, padded to even as Flux pads it."""
    ph, pw = (height + 1) // 2, (width + 1) // 2
    grid = rearrange(values, "b (h w) -> b h w", h=ph, w=pw)
    return grid.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :height, :width]
