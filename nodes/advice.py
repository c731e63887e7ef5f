"""The fixes that are steps in ComfyUI's interface, for the core's errors that name one by key
(ResidualError.advice): the core knows no nodes, the user sees them named."""

from __future__ import annotations

import functools

from ..residual_core import ResidualError

ADVICE = {
    "connect_image": "Connect a Load Image (or any IMAGE output) to the images input.",
    "connect_photos": "Connect an IMAGE with photos of the concept (3-6 is typical).",
    "scale_down": "Use 'Upscale Image By' at a scale below 1.",
    "load_image": "Or load the file with Load Image.",
    "check_upstream": "Check the nodes before the images input.",
    "update_pack": "Update the node pack.",
    "regular_lora": "A regular LoRA loads with LoraLoaderModelOnly.",
    "image_to_mask": "Use 'Convert Image to Mask' (or a segmentation node's MASK output).",
    "load_image_mask": "(Load Image gives it for a picture without transparency.)",
}


def in_ui_words(execute):
    """A node's execute whose ResidualErrors end with their fix in the interface's words."""

    @functools.wraps(execute)
    def wrapped(*args, **kwargs):
        try:
            return execute(*args, **kwargs)
        except ResidualError as e:
            if e.advice not in ADVICE or str(e).endswith(ADVICE[e.advice]):
                raise
            e.args = (f"{e} {ADVICE[e.advice]}", *e.args[1:])
            raise

    return wrapped
