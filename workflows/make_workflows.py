"""Writes the example workflows, each in ComfyUI's UI format (drag into the browser, or pick it from the
template browser: workflows/NAME.json) and API format (POST to /prompt: workflows/api/NAME.json), from
one description so the twins never drift apart.

    python workflows/make_workflows.py

The API twins sit in a subfolder because ComfyUI lists every *.json directly in workflows/ as a
template, and an API-format graph can't be opened as one. Tier-2 tests check every file against the
node definitions of the real ComfyUI, in-process and through a running server, and open the UI files
in the real frontend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Output sockets (name, type) of every node type the workflows use.
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "UNETLoader": [("MODEL", "MODEL")],
    "DualCLIPLoader": [("CLIP", "CLIP")],
    "VAELoader": [("VAE", "VAE")],
    "LoadImageSetFromFolderNode": [("IMAGE", "IMAGE")],
    "PersonalizedResidualTrain": [("residual", "PERSONALIZED_RESIDUAL"), ("loss_curve", "IMAGE"), ("samples", "IMAGE")],
    "PersonalizedResidualSave": [("lora_name", "STRING")],
    "PersonalizedResidualLoad": [("residual", "PERSONALIZED_RESIDUAL"), ("class_word", "STRING"),
                                 ("identifier", "STRING")],
    "PersonalizedResidualLAGSampler": [("model", "MODEL"), ("positive", "CONDITIONING")],
    "PersonalizedResidualLAGLoRA": [("model", "MODEL"), ("positive", "CONDITIONING"), ("clip", "CLIP")],
    "PersonalizedResidualLAGMaskPreview": [("mask_preview", "IMAGE")],
    "LoraLoaderModelOnly": [("MODEL", "MODEL")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "ConditioningZeroOut": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewImage": [],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageBatch": [("IMAGE", "IMAGE")],
    "MaskToImage": [("IMAGE", "IMAGE")],
    "ImageToMask": [("MASK", "MASK")],
}
# Each node type's size in the UI (the frontend enlarges a node that is too small for its widgets).
SIZES = {
    "CheckpointLoaderSimple": (320, 100), "UNETLoader": (320, 90), "DualCLIPLoader": (320, 130), "VAELoader": (320, 60),
    "LoadImageSetFromFolderNode": (320, 90), "PersonalizedResidualTrain": (320, 640),
    "PersonalizedResidualSave": (360, 80), "PersonalizedResidualLoad": (320, 110), "PersonalizedResidualLAGSampler": (400, 300),
    "PersonalizedResidualLAGLoRA": (400, 440), "PersonalizedResidualLAGMaskPreview": (300, 320),
    "LoraLoaderModelOnly": (320, 90), "CLIPTextEncode": (400, 150), "ConditioningZeroOut": (240, 30),
    "EmptyLatentImage": (320, 110), "KSampler": (300, 270), "VAEDecode": (200, 50), "SaveImage": (300, 320),
    "PreviewImage": (420, 280),
    "LoadImage": (320, 330), "ImageBatch": (220, 50), "MaskToImage": (220, 30), "ImageToMask": (220, 60),
}
# Widgets followed in the UI format by a "control after generate" value: the frontend adds that widget to
# every INT input named seed or noise_seed unless the schema says otherwise (ours says control_after_generate=False).
CONTROL_AFTER_GENERATE = {("KSampler", "seed")}
# From a row of training (photos, Train, and Save, loss curve and samples in a column) to the row under it.
ROW = 800
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
RESIDUAL = "sks_dog_00001.safetensors"  # what train_and_save writes first
PROMPT = "a photo of a sks dog on the beach"
TWO_PROMPT = "a photo of a sks dog and a zwx cat on the beach"
# Flux.1's files as ComfyUI's own Flux templates name them (models/diffusion_models, text_encoders, vae), and the
# users' own LoRAs (models/loras) the Flux workflows apply: placeholders for theirs.
FLUX_FILES = {"unet_name": "flux1-dev.safetensors", "clip_name1": "clip_l.safetensors",
              "clip_name2": "t5xxl_fp16.safetensors", "vae_name": "ae.safetensors"}
FLUX_LORAS = ("flux_sks_dog_lora.safetensors", "flux_zwx_cat_lora.safetensors")
FLUX_SAMPLING = {"cfg": 1.0, "steps": 20, "scheduler": "simple", "size": 1024}  # Flux.1 dev: guidance-distilled


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (node id, output slot)
    widgets: dict[str, object] = field(default_factory=dict)  # in the node's widget order
    title: str | None = None


def checkpoint(id, pos):
    return Node(id, "CheckpointLoaderSimple", pos, widgets={"ckpt_name": CHECKPOINT})


def lag_sampler(id, pos, model, residual, clip, prompt=PROMPT):
    return Node(id, "PersonalizedResidualLAGSampler", pos, {"model": model, "residual": residual, "clip": clip}, {
        "prompt": prompt, "strength": 1.0, "mode": "LAG", "mask_rule": "max_fraction", "mask_value": 0.5,
        "start_percent": 0.0, "end_percent": 1.0, "mask_strategy": "warmup"})


def sampling(first_id, x, y, model, positive, clip, vae, mask_preview=True, cfg=7.0, steps=30, scheduler="normal",
             size=512):
    """Negative prompt, empty latent, KSampler, decode, save and (for LAG) the mask preview, laid out beside
    the node at (x, y) that gives the positive prompt."""
    i = first_id
    nodes = [
        Node(i, "CLIPTextEncode", (x, y + 340), {"clip": clip}, {"text": "blurry, low quality"}, title="negative")
        if cfg > 1 else  # cfg 1 (guidance-distilled Flux.1) never runs the negative: no T5-XXL pass for it
        Node(i, "ConditioningZeroOut", (x, y + 340), {"conditioning": positive}, title="negative (unused at cfg 1)"),
        Node(i + 1, "EmptyLatentImage", (x + 440, y + 340), widgets={"width": size, "height": size, "batch_size": 1}),
        Node(i + 2, "KSampler", (x + 440, y), {"model": model, "positive": positive, "negative": (i, 0),
                                               "latent_image": (i + 1, 0)},
             {"seed": 0, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": scheduler, "denoise": 1.0}),
        Node(i + 3, "VAEDecode", (x + 780, y), {"samples": (i + 2, 0), "vae": vae}),
        Node(i + 4, "SaveImage", (x + 780, y + 120), {"images": (i + 3, 0)}, {"filename_prefix": "personalized"}),
    ]
    if mask_preview:
        nodes.append(Node(i + 5, "PersonalizedResidualLAGMaskPreview", (x + 1120, y + 120),
                          {"model": model, "latent": (i + 2, 0), "images": (i + 3, 0)}))
    return nodes


def training(first_id, ckpt, folder="concept", identifier="sks", class_word="dog", y=80):
    """Photos, Train, Save, and the loss curve and sample grid on preview nodes: five nodes, ids first_id..+4."""
    i = first_id
    return [
        Node(i, "LoadImageSetFromFolderNode", (40, y + 140), widgets={"folder": folder, "resize_method": "None"},
             title=f"concept photos (input/{folder}/)"),
        Node(i + 1, "PersonalizedResidualTrain", (400, y),
             {"model": (ckpt, 0), "clip": (ckpt, 1), "vae": (ckpt, 2), "images": (i, 0)},
             {"class_word": class_word, "identifier": identifier, "steps": 150, "learning_rate": 0.001,
              "batch_size": 4, "rank_fraction": 0.05, "seed": 0, "resolution": 512, "flip": False, "init": "zero",
              "gradient_checkpointing": False, "on_cancel": "discard",
              "sample_prompts": "", "sample_every": 0, "sample_steps": 20, "mask_marks": "subject", "captions": ""}),
        Node(i + 2, "PreviewImage", (760, y + 160), {"images": (i + 1, 1)}, title="loss curve"),
        Node(i + 3, "PersonalizedResidualSave", (760, y), {"residual": (i + 1, 0)}, {"filename_prefix": ""}),
        Node(i + 4, "PreviewImage", (760, y + 480), {"images": (i + 1, 2)}, title="samples"),
    ]


def masked_training(first_id, ckpt, photos=("sks_dog_1.png", "sks_dog_2.png")):
    """Cut-out PNGs (transparent background) through Load Image: their pictures batched as the photos, their
    MASKs (1 - alpha: 1 on the background, hence mask_marks 'background') batched the same way (as pictures:
    ComfyUI has no mask-batch node) as the masks; Train, Save, loss curve and samples. Ids first_id..+10."""
    i = first_id
    loads = [Node(i + k, "LoadImage", (40, 80 + 360 * k), widgets={"image": name}, title=f"photo {k + 1} (cut-out PNG)")
             for k, name in enumerate(photos)]
    j = i + len(photos)
    train = training(j + 5, ckpt)[1:]  # Train, its previews and Save, photos and masks from the nodes above
    train[0].pos, train[0].links = (760, 80), {**train[0].links, "images": (j, 0), "masks": (j + 4, 0)}
    train[0].widgets = {**train[0].widgets, "mask_marks": "background"}
    for node, pos in zip(train[1:], [(1120, 260), (1120, 80), (1580, 80)], strict=True):
        node.pos = pos
    return [
        *loads,
        Node(j, "ImageBatch", (400, 80), {"image1": (i, 0), "image2": (i + 1, 0)}, title="photos"),
        Node(j + 1, "MaskToImage", (400, 240), {"mask": (i, 1)}),
        Node(j + 2, "MaskToImage", (400, 320), {"mask": (i + 1, 1)}),
        Node(j + 3, "ImageBatch", (400, 400), {"image1": (j + 1, 0), "image2": (j + 2, 0)}),
        Node(j + 4, "ImageToMask", (400, 500), {"image": (j + 3, 0)}, {"channel": "red"}, title="masks"),
        *train,
    ]


def flux_loaders(first_id):
    """Flux.1 from its three files: the DiT (id first_id), the CLIP-L + T5-XXL pair (+1) and the VAE (+2)."""
    i = first_id
    return [Node(i, "UNETLoader", (40, 80), widgets={"unet_name": FLUX_FILES["unet_name"], "weight_dtype": "default"}),
            Node(i + 1, "DualCLIPLoader", (40, 210), widgets={"clip_name1": FLUX_FILES["clip_name1"],
                                                              "clip_name2": FLUX_FILES["clip_name2"], "type": "flux",
                                                              "device": "default"}),
            Node(i + 2, "VAELoader", (40, 380), widgets={"vae_name": FLUX_FILES["vae_name"]})]


def lag_lora(id, pos, model, clip, lora_name, trigger_word="sks", class_word="dog", prompt=PROMPT):
    return Node(id, "PersonalizedResidualLAGLoRA", pos, {"model": model, "clip": clip}, {
        "lora_name": lora_name, "trigger_word": trigger_word, "class_word": class_word, "prompt": prompt,
        "strength": 1.0, "unmaskable_layers": "apply globally", "mask_rule": "max_fraction", "mask_value": 0.5,
        "start_percent": 0.0, "end_percent": 1.0, "mask_strategy": "warmup"})


WORKFLOWS = {
    # Train, save, and sample with LAG in one graph (the README's example): training above, sampling below.
    "train_and_sample": [checkpoint(1, (40, 80)), *training(2, 1),
                         lag_sampler(7, (40, 80 + ROW), (1, 0), (3, 0), (1, 1)),
                         *sampling(8, 40, 80 + ROW, (7, 0), (7, 1), (1, 1), (1, 2))],
    # Train and save only.
    "train_and_save": [checkpoint(1, (40, 80)), *training(2, 1)],
    # Load a saved residual and sample it with LAG.
    "load_and_sample": [
        checkpoint(1, (40, 80)),
        Node(2, "PersonalizedResidualLoad", (40, 220), widgets={"residual_name": RESIDUAL}),
        lag_sampler(3, (400, 80), (1, 0), (2, 0), (1, 1)), *sampling(4, 400, 80, (3, 0), (3, 1), (1, 1), (1, 2)),
    ],
    # Any LoRA with LAG: its layers inside the transformer blocks only where the trigger word attends. The file
    # named is the residual train_and_save writes (a kohya LoRA too); pick your own LoRA in its place.
    "lag_lora": [
        checkpoint(1, (40, 80)),
        lag_lora(2, (40, 220), (1, 0), (1, 1), f"personalized_residuals/{RESIDUAL}"),
        *sampling(3, 480, 80, (2, 0), (2, 1), (2, 2), (1, 2)),
    ],
    # Flux.1 with a subject LoRA under LAG: the LoRA's image-stream layers only where its words attend. Pick
    # your own Flux LoRA, trigger word and class word.
    "flux_lag_lora": [
        *flux_loaders(1),
        lag_lora(4, (400, 80), (1, 0), (2, 0), FLUX_LORAS[0]),
        *sampling(5, 840, 80, (4, 0), (4, 1), (4, 2), (3, 0), **FLUX_SAMPLING),
    ],
    # Two characters' LoRAs on Flux.1 in one image, each inside its own mask (the last prompt names both).
    "flux_two_loras": [
        *flux_loaders(1),
        lag_lora(4, (400, 80), (1, 0), (2, 0), FLUX_LORAS[0], prompt=TWO_PROMPT),
        lag_lora(5, (400, 540), (4, 0), (4, 2), FLUX_LORAS[1], "zwx", "cat", TWO_PROMPT),
        *sampling(6, 840, 80, (5, 0), (5, 1), (5, 2), (3, 0), **FLUX_SAMPLING),
    ],
    # Two concepts in one image: each trained on its own photos, then a chain of two LAG Samplers. The last
    # prompt names both; each residual applies only where its own words attend.
    "two_concepts": [checkpoint(1, (40, 80)), *training(2, 1), *training(7, 1, "concept_b", "zwx", "cat", y=80 + ROW),
                     lag_sampler(12, (40, 80 + 2 * ROW), (1, 0), (3, 0), (1, 1), TWO_PROMPT),
                     lag_sampler(13, (40, 80 + 2 * ROW + 340), (12, 0), (8, 0), (1, 1), TWO_PROMPT),
                     *sampling(14, 480, 80 + 2 * ROW, (13, 0), (13, 1), (1, 1), (1, 2))],
    # The saved file as an ordinary LoRA: the stock loader applies it everywhere (no LAG, no mask).
    "stock_lora_loader": [
        checkpoint(1, (40, 80)),
        Node(2, "LoraLoaderModelOnly", (40, 220), {"model": (1, 0)},
             {"lora_name": f"personalized_residuals/{RESIDUAL}", "strength_model": 1.0}),
        Node(3, "CLIPTextEncode", (400, 80), {"clip": (1, 1)}, {"text": PROMPT}, title="positive"),
        *sampling(4, 400, 80, (2, 0), (3, 0), (1, 1), (1, 2), mask_preview=False),
    ],
    # Train on the subject only: cut-out PNGs' masks make the loss ignore their backgrounds (mask_marks
    # 'background': Load Image's MASK is 1 where the picture is transparent).
    "train_with_masks": [checkpoint(1, (400, 620)), *masked_training(2, 1)],
}


def api_format(nodes: list[Node]) -> dict:
    return {str(n.id): {"class_type": n.type, "inputs": {**n.widgets, **{k: [str(a), b] for k, (a, b) in n.links.items()}},
                        **({"_meta": {"title": n.title}} if n.title else {})} for n in nodes}


def ui_format(nodes: list[Node]) -> dict:
    links, by_id = [], {n.id: n for n in nodes}
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for n in nodes:
        for name, (src, slot) in n.links.items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, n.id, list(n.links).index(name), OUTPUTS[by_id[src].type][slot][1]])
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(n.id, name)] = link_id
    ui_nodes = []
    for order, n in enumerate(nodes):
        widgets = []
        for name, value in n.widgets.items():
            widgets.append(value)
            if (n.type, name) in CONTROL_AFTER_GENERATE:
                widgets.append("fixed")
        ui_nodes.append({
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(SIZES[n.type]), "flags": {}, "order": order,
            "mode": 0,
            "inputs": [{"name": name, "type": links[in_links[(n.id, name)] - 1][5], "link": in_links[(n.id, name)]}
                       for name in n.links],
            "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                        for slot, (name, typ) in enumerate(OUTPUTS[n.type])],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": widgets,
            **({"title": n.title} if n.title else {}),
        })
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    folder = Path(__file__).parent
    (folder / "api").mkdir(exist_ok=True)
    for name, nodes in WORKFLOWS.items():
        ids = [n.id for n in nodes]
        assert len(set(ids)) == len(ids), f"{name}: node ids used twice: {sorted({i for i in ids if ids.count(i) > 1})}"
        (folder / f"{name}.json").write_text(json.dumps(ui_format(nodes), indent=1) + "\n")
        (folder / "api" / f"{name}.json").write_text(json.dumps(api_format(nodes), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
