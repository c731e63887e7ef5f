"""Save Residual and Load Residual: files in models/loras/personalized_residuals/.

That folder sits inside ComfyUI's loras folder, so the stock LoraLoaderModelOnly lists the same files
and applies them as ordinary (global) LoRAs.
"""

from __future__ import annotations

import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..residual_core import ResidualError, fileformat
from .residual_type import CATEGORY, Residual

SUBFOLDER = "personalized_residuals"


def residual_names() -> list[str]:
    prefix = SUBFOLDER + "/"
    names = (n.replace("\\", "/") for n in folder_paths.get_filename_list("loras"))
    return sorted(n[len(prefix):] for n in names if n.startswith(prefix) and n.endswith(".safetensors"))


def residual_path(name: str) -> str:
    path = folder_paths.get_full_path("loras", f"{SUBFOLDER}/{name}")
    if path is None:
        raise ResidualError(f"No residual file {name!r} in models/loras/{SUBFOLDER}/. Pick one from the list "
                            "(press R in the UI to refresh it) or save one with Save Residual.")
    return path


def _safe_stem(name: str) -> str:
    """A file name stem that stays inside the folder; anything that could leave it is refused."""
    if os.path.isabs(name) or "/" in name or "\\" in name or name.startswith("."):
        raise ResidualError(f"filename_prefix {name!r} must be a plain name (no folders, no leading dot).")
    stem = re.sub(r"[^A-Za-z0-9._ -]+", "_", name).strip(" .")
    if not stem:
        raise ResidualError(f"filename_prefix {name!r} has no usable characters; use letters and digits.")
    return stem[:100]


class SaveResidual(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualSave",
            display_name="Save Residual",
            category=CATEGORY,
            description=f"Save a residual to models/loras/{SUBFOLDER}/ as a kohya-layout LoRA with the concept's "
                        "metadata. Load Residual and the stock LoraLoaderModelOnly both list it.",
            is_output_node=True,
            inputs=[
                Residual.Input("residual", tooltip="The residual to save (from Train Personalized Residual)."),
                io.String.Input("filename_prefix", default="", tooltip="File name; a counter is appended and no file "
                                "is overwritten. Empty: '{identifier}_{class_word}'."),
            ],
            outputs=[
                io.String.Output("lora_name", display_name="lora_name", tooltip="The saved file's name as the LoRA "
                                 f"loaders list it ('{SUBFOLDER}/...safetensors')."),
            ],
        )

    @classmethod
    def execute(cls, residual, filename_prefix) -> io.NodeOutput:
        meta = residual.meta
        stem = _safe_stem(filename_prefix.strip() or f"{meta.identifier}_{meta.class_word}")
        folder = os.path.join(folder_paths.get_folder_paths("loras")[0], SUBFOLDER)
        os.makedirs(folder, exist_ok=True)
        existing = set(os.listdir(folder))
        counter = 1
        while f"{stem}_{counter:05}.safetensors" in existing:
            counter += 1
        filename = f"{stem}_{counter:05}.safetensors"
        fileformat.save(residual, os.path.join(folder, filename))
        name = f"{SUBFOLDER}/{filename}"
        # residual_name is for API clients (in /history): the file's name as Load Residual lists it.
        return io.NodeOutput(name, ui={**ui.PreviewText(f"saved models/loras/{name}").as_dict(), "residual_name": [filename]})


class LoadResidual(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualLoad",
            display_name="Load Residual",
            category=CATEGORY,
            description=f"Load a residual saved in models/loras/{SUBFOLDER}/, with its class word and identifier.",
            inputs=[
                io.Combo.Input("residual_name", options=residual_names(), tooltip=f"A file in models/loras/{SUBFOLDER}/."),
            ],
            outputs=[
                Residual.Output("residual", display_name="residual", tooltip="The residual: connect to LAG Sampler."),
                io.String.Output("class_word", display_name="class_word", tooltip="The class word it was trained with."),
                io.String.Output("identifier", display_name="identifier", tooltip="The identifier it was trained with."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, residual_name):
        path = folder_paths.get_full_path("loras", f"{SUBFOLDER}/{residual_name}")
        return os.path.getmtime(path) if path else ""

    @classmethod
    def execute(cls, residual_name) -> io.NodeOutput:
        residual = fileformat.load(residual_path(residual_name))
        return io.NodeOutput(residual, residual.meta.class_word, residual.meta.identifier)
