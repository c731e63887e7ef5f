"""Draws docs/lag-lora-layers.png: which layers of a SpatialTransformer LAG LoRA masks, and with which mask.

The layers, their order and their kind come from running the pack's code (an SD-shaped UNet with two
transformer blocks per SpatialTransformer, classified by residual_core.layer_block), not from a list typed here:

    ~/ComfyUI/.venv/bin/python docs/lag_lora_layers.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from pack_alias import import_pack  # noqa: E402

import_pack()

from personalized_residuals.bench.world.unet import SDUNet  # noqa: E402
from personalized_residuals.residual_core import find_targets, layer_block  # noqa: E402

COLORS = {"this": "#4caf50", "previous": "#f2c12e", "unmaskable": "#b0b0b0"}
LEGEND = [("this", "masked by this step's mask (the block's attention over the depths seen so far)"),
          ("previous", "masked by the previous step's mask (nothing at the first step): runs before the mask exists"),
          ("unmaskable", "can't be masked (acts on the prompt's tokens): applied everywhere or skipped")]


def layers_in_forward_order() -> list[tuple[str, str]]:
    """(path inside the SpatialTransformer, kind) of every Linear layer, in the order one UNet call runs them."""
    unet = SDUNet(model_channels=16, channel_mult=(1,), attention_levels=(0,), num_res_blocks=1, num_heads=2,
                  transformer_depth=2, context_dim=8, use_linear=True)
    st = "input_blocks.1.1."
    order, handles = [], []
    for path, module in unet.named_modules():
        if path.startswith(st) and isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(lambda m, a, o, p=path: order.append(p)))
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 3, 8))
    targets, kinds, attended = find_targets(unet), [], False
    for path in order:
        if layer_block(path, targets) is None:
            kind, attended = "unmaskable", True  # attn2.to_k: the block's first attention map is made here
        else:
            kind = "this" if attended else "previous"
        kinds.append((path[len(st):], kind))
    return kinds


def draw(path: Path) -> None:
    font = ImageFont.load_default(size=13)
    layers = layers_in_forward_order()
    box_w, box_h, gap, left, per_row = 150, 26, 6, 160, 5
    lines = []  # (row label, boxes): consecutive layers of one transformer block share a label, 5 boxes a line
    for name, kind in layers:
        label = ".".join(name.split(".")[:2]) if name.startswith("transformer_blocks.") else ""
        short = name[len(label) + 1:] if label else name
        if not lines or lines[-1][0] != label or len(lines[-1][1]) == per_row:
            lines.append((label, []))
        lines[-1][1].append((short, kind))
    height = 60 + len(lines) * (box_h + gap) + 20 + len(LEGEND) * 20 + 40
    img = Image.new("RGB", (left + per_row * (box_w + gap) + 10, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "LAG LoRA: the layers of one SpatialTransformer (2 transformer blocks deep, as in SDXL; SD1.x/SD2.x: 1)",
           fill="black", font=font)
    d.text((10, 26), "in the order a UNet call runs them; layers outside the SpatialTransformers and the text encoder's "
           "are unmaskable too", fill="black", font=font)
    y, previous_label = 52, None
    for label, chunk in lines:
        if label != previous_label and label:
            d.text((10, y + 6), label, fill="black", font=font)
            previous_label = label
        for i, (name, kind) in enumerate(chunk):
            x = left + i * (box_w + gap)
            d.rectangle([x, y, x + box_w, y + box_h], fill=COLORS[kind], outline="#555")
            d.text((x + 6, y + 6), name, fill="black", font=font)
        y += box_h + gap
    y += 14
    for kind, text in LEGEND:
        d.rectangle([10, y, 30, y + 14], fill=COLORS[kind], outline="#555")
        d.text((38, y + 1), text, fill="black", font=font)
        y += 20
    d.text((10, y + 6), "SD1.x: proj_in and proj_out are 1x1 convs (masked the same way). SDXL's deeper blocks "
           "(up to 10) continue the pattern of transformer_blocks.1.", fill="black", font=font)
    img.save(path)


if __name__ == "__main__":
    draw(ROOT / "docs" / "lag-lora-layers.png")
    print("wrote docs/lag-lora-layers.png")
