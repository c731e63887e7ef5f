"""Writes the example workflows, each in ComfyUI's UI format (drag into the browser) and API format
(POST to /prompt), from one description so the twins never drift apart.

    python workflows/make_workflows.py

Tier-2 tests check every file against the node definitions of the real ComfyUI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Output sockets (name, type) of every node type the workflows use.
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "LoadImageSetFromFolderNode": [("IMAGE", "IMAGE")],
    "PersonalizedResidualTrain": [("residual", "PERSONALIZED_RESIDUAL"), ("loss_curve", "IMAGE")],
    "PersonalizedResidualSave": [("lora_name", "STRING")],
    "PersonalizedResidualLoad": [("residual", "PERSONALIZED_RESIDUAL"), ("class_word", "STRING"),
                                 ("identifier", "STRING")],
    "PersonalizedResidualLAGSampler": [("model", "MODEL"), ("positive", "CONDITIONING")],
    "PersonalizedResidualLAGMaskPreview": [("mask_preview", "IMAGE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewImage": [],
}
# Widgets followed in the UI format by a hidden "control after generate" value.
CONTROL_AFTER_GENERATE = {("KSampler", "seed")}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (node id, output slot)
    widgets: dict[str, object] = field(default_factory=dict)  # in the node's widget order
    title: str | None = None


def checkpoint(id, pos):
    return Node(id, "CheckpointLoaderSimple", pos, widgets={"ckpt_name": "v1-5-pruned-emaonly.safetensors"})


def lag_sampler(id, pos, model, residual, clip, prompt):
    return Node(id, "PersonalizedResidualLAGSampler", pos, {"model": model, "residual": residual, "clip": clip}, {
        "prompt": prompt, "strength": 1.0, "mode": "LAG", "mask_rule": "max_fraction", "mask_value": 0.5,
        "start_percent": 0.0, "end_percent": 1.0})


def sampling(first_id, x, lag, clip, vae):
    """Negative prompt, empty latent, KSampler, decode, save, and the LAG mask preview."""
    i = first_id
    return [
        Node(i, "CLIPTextEncode", (x, 560), {"clip": clip}, {"text": "blurry, low quality"}, title="negative"),
        Node(i + 1, "EmptyLatentImage", (x, 760), widgets={"width": 512, "height": 512, "batch_size": 1}),
        Node(i + 2, "KSampler", (x + 420, 200), {"model": (lag, 0), "positive": (lag, 1), "negative": (i, 0),
                                                 "latent_image": (i + 1, 0)},
             {"seed": 0, "steps": 30, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}),
        Node(i + 3, "VAEDecode", (x + 780, 200), {"samples": (i + 2, 0), "vae": vae}),
        Node(i + 4, "SaveImage", (x + 1060, 200), {"images": (i + 3, 0)}, {"filename_prefix": "personalized"}),
        Node(i + 5, "PersonalizedResidualLAGMaskPreview", (x + 780, 420),
             {"model": (lag, 0), "latent": (i + 2, 0), "images": (i + 3, 0)}),
    ]


def training(first_id, ckpt):
    i = first_id
    return [
        Node(i, "LoadImageSetFromFolderNode", (40, 420), widgets={"folder": "concept", "resize_method": "None"},
             title="concept photos (input/concept/)"),
        Node(i + 1, "PersonalizedResidualTrain", (420, 420),
             {"model": (ckpt, 0), "clip": (ckpt, 1), "vae": (ckpt, 2), "images": (i, 0)},
             {"class_word": "dog", "identifier": "sks", "steps": 150, "learning_rate": 0.001, "batch_size": 4,
              "rank_fraction": 0.05, "seed": 0, "resolution": 512, "flip": False, "init": "zero"}),
        Node(i + 2, "PreviewImage", (800, 620), {"images": (i + 1, 1)}, title="loss curve"),
        Node(i + 3, "PersonalizedResidualSave", (800, 420), {"residual": (i + 1, 0)}, {"filename_prefix": ""}),
    ]


PROMPT = "a photo of a sks dog on the beach"
WORKFLOWS = {
    # Train, save, and sample in one graph (the README's example).
    "train_and_sample": [checkpoint(1, (40, 200)), *training(2, 1),
                         lag_sampler(6, (1200, 200), (1, 0), (3, 0), (1, 1), PROMPT), *sampling(7, 1200, 6, (1, 1), (1, 2))],
    # Train and save only.
    "train_and_save": [checkpoint(1, (40, 200)), *training(2, 1)],
    # Load a saved residual and sample it with LAG.
    "load_and_sample": [
        checkpoint(1, (40, 200)),
        Node(2, "PersonalizedResidualLoad", (40, 420), widgets={"residual_name": "sks_dog_00001.safetensors"}),
        lag_sampler(3, (420, 200), (1, 0), (2, 0), (1, 1), PROMPT), *sampling(4, 420, 3, (1, 1), (1, 2)),
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
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": [360, 160], "flags": {}, "order": order, "mode": 0,
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
    for name, nodes in WORKFLOWS.items():
        (folder / f"{name}.json").write_text(json.dumps(ui_format(nodes), indent=1) + "\n")
        (folder / f"{name}_api.json").write_text(json.dumps(api_format(nodes), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/{name}_api.json")


if __name__ == "__main__":
    main()
