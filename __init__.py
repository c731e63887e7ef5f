"""Personalized Residuals for ComfyUI: teach Stable Diffusion a concept from a few photos and sample it
with localized attention-guided (LAG) sampling (Ham et al., CVPR 2024).

ComfyUI loads this folder as a package and awaits comfy_entrypoint(). The nodes are imported only then,
so the plain-torch core (residual_core) also imports where ComfyUI is absent.
"""

WEB_DIRECTORY = "./web"  # the web UI's side: Save Residual shows the saved file's name


async def comfy_entrypoint():
    try:
        from .nodes import PersonalizedResidualsExtension
    except ImportError as e:
        raise ImportError(
            f"Personalized Residuals needs a ComfyUI with V3 nodes (comfy_api.latest, ComfyUI 0.3.64 or newer): {e}"
        ) from e
    return PersonalizedResidualsExtension()
