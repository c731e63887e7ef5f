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
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewImage": [],
}
# Each node type's size in the UI (the frontend enlarges a node that is too small for its widgets).
SIZES = {
    "CheckpointLoaderSimple": (320, 100), "LoadImageSetFromFolderNode": (320, 90), "PersonalizedResidualTrain": (320, 560),
    "PersonalizedResidualSave": (360, 80), "PersonalizedResidualLoad": (320, 110), "PersonalizedResidualLAGSampler": (400, 300),
    "PersonalizedResidualLAGLoRA": (400, 440), "PersonalizedResidualLAGMaskPreview": (300, 320),
    "LoraLoaderModelOnly": (320, 90), "CLIPTextEncode": (400, 150),
    "EmptyLatentImage": (320, 110), "KSampler": (300, 270), "VAEDecode": (200, 50), "SaveImage": (300, 320),
    "PreviewImage": (420, 300),
}
# Widgets followed in the UI format by a "control after generate" value: the frontend adds that widget to
# every INT input named seed or noise_seed unless the schema says otherwise (ours says control_after_generate=False).
CONTROL_AFTER_GENERATE = {("KSampler", "seed")}
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
RESIDUAL = "sks_dog_00001.safetensors"  # what train_and_save writes first
PROMPT = "a photo of a sks dog on the beach"
TWO_PROMPT = "a photo of a sks dog and a zwx cat on the beach"


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
        "start_percent": 0.0, "end_percent": 1.0})


def sampling(first_id, x, y, model, positive, clip, vae, mask_preview=True):
    """Negative prompt, empty latent, KSampler, decode, save and (for LAG) the mask preview, laid out beside
    the node at (x, y) that gives the positive prompt."""
    i = first_id
    nodes = [
        Node(i, "CLIPTextEncode", (x, y + 340), {"clip": clip}, {"text": "blurry, low quality"}, title="negative"),
        Node(i + 1, "EmptyLatentImage", (x + 440, y + 340), widgets={"width": 512, "height": 512, "batch_size": 1}),
        Node(i + 2, "KSampler", (x + 440, y), {"model": model, "positive": positive, "negative": (i, 0),
                                               "latent_image": (i + 1, 0)},
             {"seed": 0, "steps": 30, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}),
        Node(i + 3, "VAEDecode", (x + 780, y), {"samples": (i + 2, 0), "vae": vae}),
        Node(i + 4, "SaveImage", (x + 780, y + 120), {"images": (i + 3, 0)}, {"filename_prefix": "personalized"}),
    ]
    if mask_preview:
        nodes.append(Node(i + 5, "PersonalizedResidualLAGMaskPreview", (x + 1120, y + 120),
                          {"model": model, "latent": (i + 2, 0), "images": (i + 3, 0)}))
    return nodes


def training(first_id, ckpt, folder="concept", identifier="sks", class_word="dog", y=80):
    i = first_id
    return [
        Node(i, "LoadImageSetFromFolderNode", (40, y + 140), widgets={"folder": folder, "resize_method": "None"},
             title=f"concept photos (input/{folder}/)"),
        Node(i + 1, "PersonalizedResidualTrain", (400, y),
             {"model": (ckpt, 0), "clip": (ckpt, 1), "vae": (ckpt, 2), "images": (i, 0)},
             {"class_word": class_word, "identifier": identifier, "steps": 150, "learning_rate": 0.001,
              "batch_size": 4, "rank_fraction": 0.05, "seed": 0, "resolution": 512, "flip": False, "init": "zero",
              "gradient_checkpointing": False, "on_cancel": "discard",
              "sample_prompts": "", "sample_every": 0, "sample_steps": 20}),
        Node(i + 2, "PreviewImage", (760, y + 180), {"images": (i + 1, 1)}, title="loss curve"),
        Node(i + 3, "PersonalizedResidualSave", (760, y), {"residual": (i + 1, 0)}, {"filename_prefix": ""}),
    ]


WORKFLOWS = {
    # Train, save, and sample with LAG in one graph (the README's example): training above, sampling below.
    "train_and_sample": [checkpoint(1, (40, 80)), *training(2, 1), lag_sampler(6, (40, 620), (1, 0), (3, 0), (1, 1)),
                         *sampling(7, 40, 620, (6, 0), (6, 1), (1, 1), (1, 2))],
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
        Node(2, "PersonalizedResidualLAGLoRA", (40, 220), {"model": (1, 0), "clip": (1, 1)}, {
            "lora_name": f"personalized_residuals/{RESIDUAL}", "trigger_word": "sks", "class_word": "dog",
            "prompt": PROMPT, "strength": 1.0, "unmaskable_layers": "apply globally", "mask_rule": "max_fraction",
            "mask_value": 0.5, "start_percent": 0.0, "end_percent": 1.0}),
        *sampling(3, 480, 80, (2, 0), (2, 1), (2, 2), (1, 2)),
    ],
    # Two concepts in one image: each trained on its own photos, then a chain of two LAG Samplers. The last
    # prompt names both; each residual applies only where its own words attend.
    "two_concepts": [checkpoint(1, (40, 80)), *training(2, 1), *training(6, 1, "concept_b", "zwx", "cat", y=620),
                     lag_sampler(10, (40, 1160), (1, 0), (3, 0), (1, 1), TWO_PROMPT),
                     lag_sampler(11, (40, 1500), (10, 0), (7, 0), (1, 1), TWO_PROMPT),
                     *sampling(12, 480, 1160, (11, 0), (11, 1), (1, 1), (1, 2))],
    # The saved file as an ordinary LoRA: the stock loader applies it everywhere (no LAG, no mask).
    "stock_lora_loader": [
        checkpoint(1, (40, 80)),
        Node(2, "LoraLoaderModelOnly", (40, 220), {"model": (1, 0)},
             {"lora_name": f"personalized_residuals/{RESIDUAL}", "strength_model": 1.0}),
        Node(3, "CLIPTextEncode", (400, 80), {"clip": (1, 1)}, {"text": PROMPT}, title="positive"),
        *sampling(4, 400, 80, (2, 0), (3, 0), (1, 1), (1, 2), mask_preview=False),
    ],
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
        (folder / f"{name}.json").write_text(json.dumps(ui_format(nodes), indent=1) + "\n")
        (folder / "api" / f"{name}.json").write_text(json.dumps(api_format(nodes), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
