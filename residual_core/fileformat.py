"""Residual files: safetensors in the kohya LoRA layout, plus the concept's metadata.

Keys per layer: `lora_unet_<layer>.lora_down.weight` [r, in(, 1, 1)], `.lora_up.weight` [out, r(, 1, 1)]
and `.alpha` (= r, so the scale is 1); 4-D for SD1.x's conv proj_out. Any LoRA loader that reads kohya
files (ComfyUI's LoraLoaderModelOnly, A1111, kohya's tools) applies it as a global residual.
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ResidualError
from .residual import LowRankResidual, ResidualMeta, ResidualSet

FORMAT = "personalized_residual"
FORMAT_VERSION = 1
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def to_state_dict(residual: ResidualSet) -> dict[str, torch.Tensor]:
    sd = {}
    for key, layer in residual.layers.items():
        down, up = layer.down.detach().float().cpu(), layer.up.detach().float().cpu()
        if layer.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return sd


def metadata(residual: ResidualSet) -> dict[str, str]:
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), **residual.meta.as_strings()}


def from_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> ResidualSet:
    """Build a ResidualSet from kohya-layout tensors, saying exactly what is wrong when it can't."""
    meta = meta or {}
    if meta.get("format", FORMAT) != FORMAT:
        raise ResidualError(f"This file's format is {meta['format']!r}, not a personalized residual.")
    version = meta.get("format_version", str(FORMAT_VERSION))
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ResidualError(
            f"This residual file has format version {version}; this pack reads up to {FORMAT_VERSION}. "
            "Update the node pack."
        )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in sd.items():
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            unknown.append(name)
            continue
        groups.setdefault(name[: -len(suffix)], {})[suffix] = tensor
    proj = {k: v for k, v in groups.items() if k.startswith("lora_unet_") and k.endswith("_proj_out")}
    if not proj:
        example = next(iter(sd), "nothing")
        raise ResidualError(
            f"This file has no proj_out residuals ({len(sd)} tensors, e.g. {example!r}): it is not a personalized "
            "residual. A regular LoRA loads with LoraLoaderModelOnly."
        )
    other = unknown + sorted(k for k in groups if k not in proj)
    if other:
        raise ResidualError(f"Unexpected tensors in a residual file: {other[:5]} ({len(other)} in all).")
    layers = {}
    for key, parts in proj.items():
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise ResidualError(f"Layer {key} needs both lora_down.weight and lora_up.weight; the file is incomplete.")
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        conv = down.ndim == 4
        ok = (
            down.ndim == up.ndim and down.ndim in (2, 4)
            and (not conv or (down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1)))
            and up.shape[1] == down.shape[0]
        )
        if not ok:
            raise ResidualError(
                f"Layer {key}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} are not the two factors "
                "of a low-rank [out, r] x [r, in] matrix (or 1x1 kernels)."
            )
        tensors = [down, up] + ([parts[".alpha"]] if ".alpha" in parts else [])
        if not all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in tensors):
            raise ResidualError(f"Layer {key} holds non-finite or non-float values; the file is damaged.")
        alpha = float(parts[".alpha"]) if ".alpha" in parts else None
        layer = LowRankResidual(up.shape[0], down.shape[1], down.shape[0], conv, alpha)
        with torch.no_grad():
            layer.down.copy_(down.reshape(down.shape[0], down.shape[1]).float())
            layer.up.copy_(up.reshape(up.shape[0], up.shape[1]).float())
        layers[key] = layer
    return ResidualSet(layers, ResidualMeta.from_strings(meta))


def save(residual: ResidualSet, path: str) -> None:
    """Write atomically: a temporary file in the same folder, renamed into place when complete."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(to_state_dict(residual), tmp, metadata=metadata(residual))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: str) -> ResidualSet:
    """Read a residual file (safetensors only: nothing is unpickled)."""
    if not path.endswith(".safetensors"):
        raise ResidualError(f"{os.path.basename(path)!r} is not a .safetensors file; only safetensors are read.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ResidualError(f"Can't read {os.path.basename(path)!r}: {e}. The file is damaged or not safetensors.") from None
    return from_state_dict(sd, meta)
