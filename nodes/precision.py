"""Training on whatever precision and attention kernel ComfyUI runs the UNet with.

Every ComfyUI symbol read here is named in a comment where it is used (they are few, and meant to move into
comfy_model.py with the pack's other ComfyUI internals).
"""

from __future__ import annotations

import logging

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import torch

from ..residual_core import LossScaler, ResidualError

# comfy.ldm.modules.attention.attention_sage / attention_flash: their kernels have no backward pass (sage's
# output carries no gradient; flash's custom op raises in backward).
_NO_BACKWARD = {"attention_sage": "SageAttention", "attention_flash": "FlashAttention"}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs where ComfyUI counts bf16 as native (comfy.model_management.should_use_bf16:
    Ampere and newer; not a T4, V100 or RTX 20xx, where torch only emulates it, nor with --force-fp32); the
    residual's factors and the optimiser stay float32. Elsewhere the model runs in its own dtype."""
    if device.type == "cuda" and comfy.model_management.should_use_bf16(device):
        return torch.bfloat16
    return None


def compute_dtype(base_model) -> torch.dtype:
    """The dtype the UNet computes in: comfy.model_base.BaseModel.manual_cast_dtype when ComfyUI casts the
    weights layer by layer (fp8 weights; bf16 weights on a GPU without bf16; any weights on the CPU), else
    the weights' own dtype (BaseModel.get_dtype())."""
    return base_model.manual_cast_dtype or base_model.get_dtype()


def loss_scaler(base_model, autocast: torch.dtype | None) -> LossScaler | None:
    """A LossScaler when the training pass computes in float16, else None (bf16 and fp32 need none)."""
    return LossScaler() if (autocast or compute_dtype(base_model)) == torch.float16 else None


def _kernel_name(func) -> str:
    return getattr(func, "__wrapped__", func).__name__


def attention_without_backward() -> str | None:
    """The name of ComfyUI's attention kernel when it has no backward pass, else None. The kernel is
    comfy.ldm.modules.attention.optimized_attention, picked once at import from the command line
    (--use-sage-attention, --use-flash-attention)."""
    return _NO_BACKWARD.get(_kernel_name(comfy_attention.optimized_attention))


def training_attention(transformer_options: dict) -> dict:
    """transformer_options for the training pass: attention kernels with no backward pass are swapped for
    PyTorch's (comfy.ldm.modules.attention.attention_pytorch) for this pass only; sampling keeps them.

    It goes through transformer_options["optimized_attention_override"], which ComfyUI's wrap_attn calls as
    override(kernel, *args, **kwargs) instead of the kernel. An override another node set (a patch that
    picks a kernel per model) is chained, handed the swapped kernel. If attention still returns a result
    with no gradient while its inputs have one, training stops with an error before any update."""
    previous = transformer_options.get("optimized_attention_override")
    fallback = comfy_attention.attention_pytorch.__wrapped__  # the undecorated kernel, as wrap_attn hands them
    name = attention_without_backward()
    if name is not None:
        logging.info("Train Personalized Residual: ComfyUI's attention is %s, which has no backward pass; the "
                     "training pass uses PyTorch attention instead (sampling keeps %s).", name, name)

    def override(kernel, *args, **kwargs):
        if _kernel_name(kernel) in _NO_BACKWARD:
            kernel = fallback
        out = previous(kernel, *args, **kwargs) if previous is not None else kernel(*args, **kwargs)
        if torch.is_grad_enabled() and not out.requires_grad and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args[:3]):
            raise ResidualError(
                "Training needs gradients through attention, but the attention kernel in use returned none (a kernel "
                "with no backward pass, such as SageAttention or FlashAttention, set by a patch node). Remove that "
                "patch node from the training branch of the workflow.")
        return out

    return {**transformer_options, "optimized_attention_override": override}
