"""Save Residual and Load Residual: files in models/loras/personalized_residuals/.

That folder sits inside ComfyUI's loras folder, so the stock LoraLoaderModelOnly lists the same files
and applies them as ordinary (global) LoRAs.
"""

from __future__ import annotations

import logging
import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..residual_core import ResidualError, fileformat
from .advice import in_ui_words
from .residual_type import CATEGORY, Residual

SUBFOLDER = "personalized_residuals"


def residual_names() -> list[str]:
    prefix = SUBFOLDER + "/"
    names = (n.replace("\\", "/") for n in folder_paths.get_filename_list("loras"))
    return sorted(n[len(prefix):] for n in names if n.startswith(prefix) and n.endswith(".safetensors"))


def residual_path(name: str) -> str:
    """The file `name` of the residual folder; names that could reach outside it are refused."""
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts or not name.endswith(".safetensors"):
        raise ResidualError(f"residual_name {name!r} must be a .safetensors file inside models/loras/{SUBFOLDER}/ "
                            "(no absolute paths, no '..'). Pick one from the list.")
    path = folder_paths.get_full_path("loras", f"{SUBFOLDER}/{name}")
    if path is None:
        raise ResidualError(f"No residual file {name!r} in models/loras/{SUBFOLDER}/. Pick one from the list "
                            "(press R in the UI to refresh it) or save one with Save Residual.")
    return path


def _safe_stem(name: str) -> str:
    """A file name stem that stays inside the folder: anything path-like is refused, odd characters replaced."""
    if os.path.isabs(name) or "/" in name or "\\" in name or name.startswith("."):
        raise ResidualError(f"filename_prefix {name!r} must be a plain name (no folders, no leading dot).")
    stem = re.sub(r"[^\w. -]+", "_", name).strip(" .")  # letters of any script, digits, _ . - and spaces
    if not stem:
        raise ResidualError(f"filename_prefix {name!r} has no usable characters; use letters and digits.")
    return stem[:100]


def _free_names(folder: str, stem: str):
    """stem_00001.safetensors, stem_00002...: the names not in use (compared case-insensitively, as Windows and
    macOS do), in order."""
    taken = {n.lower() for n in os.listdir(folder)}
    for c in range(1, 100_000):
        if f"{stem}_{c:05}.safetensors".lower() not in taken:
            yield f"{stem}_{c:05}.safetensors"


class SaveResidual(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualSave",
            display_name="Save Residual",
            category=CATEGORY,
            description=f"Save a personalized residual to models/loras/{SUBFOLDER}/ as a kohya-layout LoRA with the concept's "
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
    @in_ui_words
    def execute(cls, residual, filename_prefix) -> io.NodeOutput:
        meta = residual.meta
        stem = _safe_stem(filename_prefix.strip() or f"{meta.identifier}_{meta.class_word}")
        folder = os.path.join(folder_paths.get_folder_paths("loras")[0], SUBFOLDER)
        os.makedirs(folder, exist_ok=True)
        for filename in _free_names(folder, stem):
            try:  # the save itself refuses a name taken meanwhile (another ComfyUI on the same folder)
                fileformat.save(residual, os.path.join(folder, filename))
                break
            except FileExistsError:
                continue
        else:
            raise ResidualError(f"Save Residual: no free file name for {stem!r}; use another filename_prefix.")
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
            description=f"Load a personalized residual (a LoRA file) saved in models/loras/{SUBFOLDER}/, with its "
                        "class word and identifier.",
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
    @in_ui_words
    def execute(cls, residual_name) -> io.NodeOutput:
        residual = fileformat.load(residual_path(residual_name))
        meta = residual.meta
        if not meta.class_word or not meta.identifier:
            logging.warning("Load Residual: %s has no class word or identifier in its metadata (saved by another "
                            "tool?). LAG mode needs them; the LAG Sampler's global mode works without.", residual_name)
        return io.NodeOutput(residual, meta.class_word, meta.identifier)
