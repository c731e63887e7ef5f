"""Residual files: safetensors in the kohya LoRA layout, plus the concept's metadata.

Keys per layer: `lora_unet_<layer>.lora_down.weight` [r, in(, 1, 1)], `.lora_up.weight` [out, r(, 1, 1)]
and `.alpha` (= r, so the scale is 1); 4-D for SD1.x's conv proj_out. Any LoRA loader that reads kohya
files (ComfyUI's LoraLoaderModelOnly, A1111, kohya's tools) applies it as a global residual. The kohya
names (diffusers' block numbering for SD; the module path with underscores for Flux, as kohya's Flux LoRAs
have it: lora_unet_double_blocks_0_img_attn_proj, lora_unet_single_blocks_0_linear2) live here only: a
ResidualSet is keyed by module path.
"""

from __future__ import annotations

import os
import re
import tempfile

import safetensors.torch
import torch
from safetensors import safe_open

from .errors import ResidualError
from .residual import LowRankResidual, ResidualMeta, ResidualSet
from .targets import family_name

# Diffusers numbers a UNet level's blocks apart from its down/upsampler: every SD1.x, SD2.x and SDXL UNet
# has 2 res blocks per level, so 3 LDM blocks per level (input_blocks.1 = down_blocks.0.attentions.0).
_PER_LEVEL = 3
_PATH = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.1\.proj_out|middle_block\.1\.proj_out")
_KOHYA = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_attentions_(\d+)_proj_out|lora_unet_mid_block_attentions_0_proj_out")
_FLUX_PATH = re.compile(r"(double_blocks\.\d+\.img_attn\.proj|single_blocks\.\d+\.linear2)")
_FLUX_KOHYA = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_(img_attn_proj|linear2)")
_FLUX_LAYER = {"img_attn_proj": "img_attn.proj", "linear2": "linear2"}


def kohya_key(path: str) -> str:
    """'input_blocks.1.1.proj_out' -> 'lora_unet_down_blocks_0_attentions_0_proj_out' (and mid, up);
    'double_blocks.0.img_attn.proj' -> 'lora_unet_double_blocks_0_img_attn_proj'."""
    if _FLUX_PATH.fullmatch(path):
        return "lora_unet_" + path.replace(".", "_")
    m = _PATH.fullmatch(path)
    if m is None:
        raise ResidualError(f"{path!r} is not a transformer block's proj_out of an SD UNet: no kohya name for it.")
    if m.group(1) is None:
        return "lora_unet_mid_block_attentions_0_proj_out"
    i = int(m.group(2))
    if m.group(1) == "input_blocks":
        return f"lora_unet_down_blocks_{(i - 1) // _PER_LEVEL}_attentions_{(i - 1) % _PER_LEVEL}_proj_out"
    return f"lora_unet_up_blocks_{i // _PER_LEVEL}_attentions_{i % _PER_LEVEL}_proj_out"


def module_path(key: str) -> str:
    """The inverse of kohya_key."""
    flux = _FLUX_KOHYA.fullmatch(key)
    if flux is not None:
        return f"{flux.group(1)}_blocks.{flux.group(2)}.{_FLUX_LAYER[flux.group(3)]}"
    m = _KOHYA.fullmatch(key)
    if m is None:
        raise ResidualError(f"Layer {key} is not a transformer block's proj_out of an SD UNet; the file is damaged.")
    if m.group(1) is None:
        return "middle_block.1.proj_out"
    level, i = int(m.group(2)), int(m.group(3))
    if m.group(1) == "down":
        return f"input_blocks.{level * _PER_LEVEL + i + 1}.1.proj_out"
    return f"output_blocks.{level * _PER_LEVEL + i}.1.proj_out"


FORMAT = "personalized_residual"
FORMAT_VERSION = 1
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def to_state_dict(residual: ResidualSet) -> dict[str, torch.Tensor]:
    sd = {}
    for path, layer in residual.layers.items():
        key = kohya_key(path)
        down, up = layer.down.detach().float().cpu(), layer.up.detach().float().cpu()
        if layer.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return sd


def metadata(residual: ResidualSet) -> dict[str, str]:
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), **residual.meta.as_strings()}


def _check_format(meta: dict[str, str]) -> None:
    """A file without metadata is read as a plain kohya LoRA; a format this pack doesn't know is refused."""
    if meta.get("format", FORMAT) != FORMAT:
        raise ResidualError(f"This file's format is {meta['format']!r}, not a personalized residual.")
    version = meta.get("format_version", str(FORMAT_VERSION))
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ResidualError(
            f"This residual file has format version {version!r}; this pack reads up to {FORMAT_VERSION}.",
            advice="update_pack")


def _layer_keys(names) -> list[str]:
    """The layer names of a residual file, from its tensor names alone (before any tensor is read)."""
    groups, unknown, names = set(), [], set(names)
    for name in sorted(names):
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            unknown.append(name)
        else:
            groups.add(name[: -len(suffix)])
    proj = sorted(k for k in groups if _KOHYA.fullmatch(k) or _FLUX_KOHYA.fullmatch(k))
    if not proj:
        example = min(names, default="nothing")
        raise ResidualError(
            f"This file has no proj_out residuals (SD) nor img_attn.proj / linear2 ones (Flux) ({len(names)} tensors, "
            f"e.g. {example!r}): it is not a personalized "
            "residual.", advice="regular_lora")
    other = unknown + sorted(k for k in groups if k not in proj)
    if other:
        raise ResidualError(
            f"This file holds tensors besides proj_out (SD) or img_attn.proj / linear2 (Flux) residuals: {other[:3]} "
            f"({len(other)} in all). It is a "
            "regular LoRA or a damaged residual.", advice="regular_lora")
    if any(_FLUX_KOHYA.fullmatch(k) for k in proj) and any(_KOHYA.fullmatch(k) for k in proj):
        raise ResidualError("This file mixes SD UNet and Flux layers; no model has both. It is damaged.")
    for key in proj:
        if f"{key}.lora_down.weight" not in names or f"{key}.lora_up.weight" not in names:
            raise ResidualError(f"Layer {key} needs both lora_down.weight and lora_up.weight; the file is incomplete.")
    return proj


def _layer(key: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None) -> LowRankResidual:
    conv = down.ndim == 4
    ok = (
        down.ndim == up.ndim and down.ndim in (2, 4)
        and (not conv or (down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1)))
        and up.shape[1] == down.shape[0] and min(down.shape[0], down.shape[1], up.shape[0]) >= 1
    )
    if not ok:
        raise ResidualError(
            f"Layer {key}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} are not the two factors "
            "of a low-rank [out, r] x [r, in] matrix (or 1x1 kernels); the file is damaged."
        )
    tensors = [down, up] + ([alpha] if alpha is not None else [])
    if alpha is not None and alpha.numel() != 1:
        raise ResidualError(f"Layer {key}: alpha has shape {tuple(alpha.shape)}, not one number; the file is damaged.")
    if not all(t.is_floating_point() and bool(torch.isfinite(t.float()).all()) for t in tensors):
        raise ResidualError(f"Layer {key} holds non-finite or non-float values; the file is damaged.")
    layer = LowRankResidual(up.shape[0], down.shape[1], down.shape[0], conv, None if alpha is None else float(alpha))
    with torch.no_grad():
        layer.down.copy_(down.reshape(down.shape[0], down.shape[1]).float())
        layer.up.copy_(up.reshape(up.shape[0], up.shape[1]).float())
    return layer


def from_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> ResidualSet:
    """Build a ResidualSet from kohya-layout tensors, saying exactly what is wrong when it can't."""
    meta = meta or {}
    _check_format(meta)
    return _build(_layer_keys(sd), sd.get, meta)


def _build(keys: list[str], tensor, meta: dict[str, str]) -> ResidualSet:
    """tensor(name) -> the named tensor, or None when the file has none (alpha is optional)."""
    info = ResidualMeta.from_strings(meta)
    layers = {module_path(k): _layer(k, tensor(f"{k}.lora_down.weight"), tensor(f"{k}.lora_up.weight"),
                                     tensor(f"{k}.alpha")) for k in keys}
    if len({layer.conv for layer in layers.values()}) > 1:
        raise ResidualError("This file mixes conv (4-D) and linear (2-D) layers; no SD UNet has both. It is damaged.")
    family = family_name(list(layers), {layer.up.shape[0] for layer in layers.values()}, next(iter(layers.values())).conv)
    if info.base_family and info.base_family != family:
        raise ResidualError(f"The file's metadata says it is for {info.base_family} but its tensors are shaped for "
                            f"{family}: the file was edited or damaged.")
    info.base_family = family
    return ResidualSet(layers, info)


def save(residual: ResidualSet, path: str, overwrite: bool = False) -> None:
    """Write atomically: a temporary file in the same folder, flushed to disk, then put in place whole.

    An existing file is never replaced unless `overwrite` (FileExistsError otherwise). The temporary file is
    hidden and not named *.safetensors, so no loader lists it even if the process is killed mid-write.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(safetensors.torch.save(to_state_dict(residual), metadata=metadata(residual)))
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _place_new(tmp: str, path: str) -> None:
    """Give the finished file its name only if that name is free (a hard link fails if it exists)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{os.path.basename(path)!r} exists; it was not overwritten. Pick another name.") from None
    except OSError:  # file systems without hard links (FAT, some network shares): check, then rename
        if os.path.exists(path):
            raise FileExistsError(f"{os.path.basename(path)!r} exists; it was not overwritten. Pick another name.") from None
        os.replace(tmp, path)


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (nothing is unpickled), with a ResidualError naming a damaged file."""
    if not path.endswith(".safetensors"):
        raise ResidualError(f"{os.path.basename(path)!r} is not a .safetensors file; only safetensors are read.")
    try:
        return safetensors.torch.load_file(path)
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise ResidualError(f"Can't read {os.path.basename(path)!r}: {e}. The file is damaged or not safetensors.") from None


def load(path: str) -> ResidualSet:
    """Read a residual file (safetensors only: nothing is unpickled). Names and metadata are checked before
    any tensor is read, so a checkpoint or a regular LoRA is refused without loading it."""
    if not path.endswith(".safetensors"):
        raise ResidualError(f"{os.path.basename(path)!r} is not a .safetensors file; only safetensors are read.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            _check_format(meta)
            names = set(f.keys())
            keys = _layer_keys(names)
            return _build(keys, lambda name: f.get_tensor(name) if name in names else None, meta)
    except ResidualError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise ResidualError(f"Can't read {os.path.basename(path)!r}: {e}. The file is damaged or not safetensors.") from None
