"""LAG Sampler (a MODEL patch in front of the stock KSampler) and LAG Mask Preview (after it).

The patch is a DIFFUSION_MODEL wrapper: for each UNet call it attaches the residual with forward hooks
(residual_core.attach) and removes them when the call returns. It replaces nothing: weight patches
(a stock LoRA on the same proj_out), attention replace patches (IP-Adapter) and other wrappers run as
before, and the model's weights are never touched.
"""

from __future__ import annotations

import logging

from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io, ui

from ..residual_core import MASK_RULES, LagSession, ResidualError, attach, locate_concept
from ..residual_core.errors import check_range
from ..residual_core.lag import check_rule
from .comfy_model import base_hash, targets_of, tokenizer_of
from .pictures import mask_preview
from .residual_type import CATEGORY, Residual

PATCH_KEY = "personalized_residuals.lag"
MODES = ("LAG", "global")


class LagPatch:
    """One concept's residual on a MODEL: the wrapper, the per-run reset, and the masks of the last run."""

    def __init__(self, residual, targets, strength, session: LagSession | None, sigma_window):
        self.residual, self.targets, self.strength = residual, targets, strength
        self.session = session  # None in global mode
        self.sigma_window = sigma_window  # (low, high), or None for every step

    def wrapper(self, executor, *args, **kwargs):
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        if self.sigma_window is not None and "sigmas" in options:
            sigma = float(options["sigmas"].max())  # one host sync per call, only when a window is set
            if not self.sigma_window[0] <= sigma <= self.sigma_window[1]:
                return executor(*args, **kwargs)
        with attach(executor.class_obj, self.residual, self.strength, self.session,
                    options.get("cond_or_uncond"), self.targets):
            return executor(*args, **kwargs)

    def on_pre_run(self, patcher):
        if self.session is not None:
            self.session.reset()


class LagSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualLAGSampler",
            display_name="LAG Sampler",
            category=CATEGORY,
            description=(
                "Apply a personalized residual for the stock KSampler. LAG mode applies it only where the "
                "concept's identifier and class word attend in each transformer block, so the rest of the image "
                "keeps the base model's prior; global mode applies it everywhere. Connect both outputs to the "
                "KSampler; the prompt is typed here once."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to sample with (the checkpoint's, or after other patches)."),
                Residual.Input("residual", tooltip="From Train Personalized Residual or Load Residual."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: encodes the prompt and finds the concept's tokens."),
                io.String.Input("prompt", multiline=True, default="a photo of a sks dog on the beach",
                                tooltip="The positive prompt. It must contain the residual's identifier and class "
                                "word, e.g. 'a sks dog' (weights like '(sks dog:1.2)' are fine)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Multiplies the residual (1 = as trained)."),
                io.Combo.Input("mode", options=list(MODES), default="LAG", tooltip="LAG: only where the concept is "
                               "attended. global: everywhere, like a LoRA loader."),
                io.Combo.Input("mask_rule", options=list(MASK_RULES), default="max_fraction", tooltip="How attention "
                               "becomes a mask: max_fraction (>= value x the max), median or mean (above the "
                               "image's median / mean), soft (graded: (attention / max) ^ value)."),
                io.Float.Input("mask_value", default=0.5, min=0.01, max=10.0, step=0.01, tooltip="max_fraction: the "
                               "fraction of the max (0.5); soft: the exponent (1 = linear); unused by median and mean."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Apply the residual from this point of the sampling schedule..."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="...up to this point. Outside, the base model samples alone."),
            ],
            outputs=[
                io.Model.Output("lag_model", display_name="model", tooltip="The model with the residual; the input MODEL "
                                "is unchanged."),
                io.Conditioning.Output("positive", display_name="positive", tooltip="The encoded prompt: the "
                                       "KSampler's positive input (LAG locates the concept's tokens in it)."),
            ],
        )

    @classmethod
    def execute(cls, model, residual, clip, prompt, strength, mode, mask_rule, mask_value, start_percent,
                end_percent) -> io.NodeOutput:
        if mode not in MODES:
            raise ResidualError(f"mode must be one of {MODES}, got {mode!r}.")
        check_range("strength", strength, -4, 4, "1 applies the residual as trained.")
        check_range("start_percent", start_percent, 0, 1)
        check_range("end_percent", end_percent, 0, 1)
        if start_percent > end_percent:
            raise ResidualError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}).")
        check_rule(mask_rule, mask_value)
        targets = targets_of(model)
        residual.check_fits(targets)
        meta = residual.meta
        if mode == "LAG" and not (meta.class_word and meta.identifier):
            raise ResidualError(
                "This residual has no class word or identifier in its metadata (a file saved by another tool?), so "
                "LAG can't find the concept in the prompt. Use mode 'global', or train the concept with Train "
                "Personalized Residual."
            )
        if meta.base_hash and meta.base_hash != base_hash(model, targets):
            logging.warning("LAG Sampler: residual '%s %s' was trained on another checkpoint of the same family; "
                            "it may look different here.", meta.identifier, meta.class_word)
        tokens = clip.tokenize(prompt)
        session = None
        if mode == "LAG":
            concept = locate_concept(tokenizer_of(clip), prompt, meta.identifier, meta.class_word)
            session = LagSession(concept.positions, concept.prompt_tokens, mask_rule, mask_value)
        window = None
        if start_percent > 0 or end_percent < 1:
            sampling = model.get_model_object("model_sampling")
            window = (sampling.percent_to_sigma(end_percent), sampling.percent_to_sigma(start_percent))

        m = model.clone()
        patch = LagPatch(residual, targets, strength, session, window)
        key = f"{PATCH_KEY}.{sum(k.startswith(PATCH_KEY) for k in m.attachments)}"
        m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, key, patch.wrapper)
        m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, key, patch.on_pre_run)
        m.set_attachments(key, patch)
        return io.NodeOutput(m, clip.encode_from_tokens_scheduled(tokens))


class LagMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualLAGMaskPreview",
            display_name="LAG Mask Preview",
            category=CATEGORY,
            description="Show where LAG applied the residual in the last sampling run: the mask averaged over "
                        "blocks and steps, tinted red over the images or as a heat map.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of the LAG Sampler that the KSampler used."),
                io.Latent.Input("latent", tooltip="The KSampler's output: runs this node after sampling."),
                io.Image.Input("images", optional=True, tooltip="The decoded images, to draw the mask over them."),
            ],
            outputs=[
                io.Image.Output("mask_preview", display_name="mask_preview",
                                tooltip="Red: where the residual applied (fraction of steps and blocks)."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, images=None) -> io.NodeOutput:
        patches = [p for k, p in sorted(model.attachments.items()) if k.startswith(PATCH_KEY)]
        if not patches:
            raise ResidualError("LAG Mask Preview: this MODEL has no LAG patch; connect the LAG Sampler's model output.")
        lag = [p for p in patches if p.session is not None]
        masks = lag[-1].session.mean_masks() if lag else {}
        if not masks:
            raise ResidualError("LAG Mask Preview: no masks were recorded. Sample with this MODEL first (mode LAG, "
                                "with the LAG Sampler's positive conditioning).")
        preview = mask_preview(masks, tuple(latent["samples"].shape[-2:]), images=images)
        return io.NodeOutput(preview, ui=ui.PreviewImage(preview, cls=cls))
