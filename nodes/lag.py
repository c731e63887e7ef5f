"""LAG Sampler (a MODEL patch in front of the stock KSampler) and LAG Mask Preview (after it).

The patch is a DIFFUSION_MODEL wrapper: for each UNet (or Flux DiT) call it attaches the residuals (and the
LAG LoRAs of lora.py) with forward hooks (residual_core.attach) and removes them when the call returns; when
the core asks for an attention override (Flux's maps, the `bias` modifier) it is installed in the call's
transformer_options in front of any other node's. It replaces nothing: weight patches (a stock LoRA on the
same proj_out), attention replace patches (IP-Adapter), other overrides and wrappers run as before, and the
model's weights are never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io, ui

from ..residual_core import (
    DEFAULT_MASK_STRATEGY,
    MASK_RULES,
    MASK_STRATEGIES,
    CallLayout,
    Concept,
    LagSession,
    ResidualError,
    ResidualSet,
    attach,
    check_range,
    check_rule,
    check_strategy,
    locate_concept,
)
from .advice import in_ui_words
from .comfy_model import (
    attention_override,
    base_hash,
    call_args_of,
    check_companions,
    cond_entries,
    encode_prompt,
    family_of,
    merge_cond_passes,
    schedule_position,
    targets_of,
    tokenizer_of,
    unet_call_arg,
)
from .pictures import mask_preview
from .residual_type import CATEGORY, Residual

PATCH_KEY = "personalized_residuals.lag"
MODES = ("LAG", "global")
# A prompt made before the mask_strategy input existed (API JSON without it) keeps the masks it had then; a new
# node gets DEFAULT_MASK_STRATEGY (the schema's default).
LEGACY_STRATEGY = "per_block"


@dataclass(frozen=True)
class LagConcept:
    """What one LAG node adds: a residual (or a LoRA's maskable layers), how strongly, where (LAG words or
    everywhere), when."""

    residual: ResidualSet
    identifier: str
    class_word: str
    strength: float
    rule: tuple[str, float] | None  # (mask rule, value) in LAG mode, None in global mode
    sigma_window: tuple[float, float] | None  # (low, high), or None for every step
    strategy: str = LEGACY_STRATEGY  # which attention map makes the mask (residual_core/masks.py)

    @property
    def name(self) -> str:
        return f"{self.identifier} {self.class_word}"


class _LagFirst(Exception):
    """A UNet call of followers (the negative prompt, a prompt combined with ours) came before this
    evaluation's LAG chunk: their mask does not exist yet. Raised before the call computes anything."""


class LagPatch:
    """Every concept the LAG nodes of a chain (LAG Sampler, LAG LoRA) put on a MODEL, applied together by one
    wrapper, so several concepts share an image (each masked by its own words) in a single UNet pass.

    The LAG sessions belong to the prompt of the last node of the chain: the prompt the KSampler gets. Clones
    of the MODEL made downstream (FreeU, PAG, another LoRA) share this patch, so LAG Mask Preview on the LAG
    node's MODEL shows the run of any of them.

    Two wrappers: per model evaluation (CALC_COND_BATCH) it finds which conditioning entries hold the LAG
    prompt and where each lies in the latent, and sees that they run before the others (so cond and uncond
    rows of a sample get the same mask in every batching order); per UNet call (DIFFUSION_MODEL) it attaches
    the residuals with the call's layout.
    """

    def __init__(self, concepts: list[LagConcept], sessions: list[LagSession | None], family, targets):
        self.concepts, self.sessions, self.family, self.targets = concepts, sessions, family, targets
        self.call_args = call_args_of(family)
        self.on_pre_run(None)

    def on_pre_run(self, patcher):
        """A sampling run starts: forget the last one."""
        for session in self.sessions:
            if session is not None:
                session.reset()
        self.holds: dict[int, bool] = {}  # id(entry) -> it holds the LAG prompt (entries live for the run)
        self.frames: dict[object, tuple | None] = {}
        self.latent: tuple[int, int] | None = None
        self.checked = self.reordered = False

    def _holds(self, e) -> bool:
        key = id(e.entry)
        if key not in self.holds:
            self.holds[key] = e.tokens is not None and any(
                s is not None and s.locate(e.tokens[:1]) is not None for s in self.sessions)
        return self.holds[key]

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        if not any(self.sessions):
            return executor(model, conds, x_in, timestep, model_options)
        entries = cond_entries(conds, x_in, timestep)
        self.frames.update((e.uuid, e.frame) for e in entries)
        self.latent = tuple(x_in.shape[-2:])
        lag = [e for e in entries if self._holds(e)]
        if not self.checked:  # the run's first evaluation: the positive must hold the prompt
            self.checked = True
            if not lag:
                raise ResidualError(
                    f"LAG: the KSampler's conditioning does not hold the words {self._names()} as the LAG node encoded "
                    "them, so no mask can be made. Connect the LAG node's positive output (directly, or through "
                    "ConditioningCombine, -Concat, -SetArea, -SetMask, -SetTimestepRange or ControlNet Apply). "
                    "ConditioningZeroOut and ConditioningAverage (below strength 1) change those tokens: apply them to "
                    "another prompt and combine it with the LAG positive.")
        if lag:  # an evaluation without the LAG prompt (SAG's extra pass on the negative) keeps the last masks
            position = schedule_position(model_options, timestep)
            for s in self.sessions:
                if s is not None:
                    s.begin_evaluation(frozenset(e.frame for e in lag if e.active), position)
        try:
            return executor(model, conds, x_in, timestep, model_options)
        except _LagFirst:  # ComfyUI ran a follower first (low memory, areas): LAG entries alone, then the rest
            first = {id(e.entry) for e in lag}
            passes = [[None if c is None else [e for e in c if (id(e) in first) == part] for c in conds]
                      for part in (True, False)]
            self.reordered = True  # no second refusal: whatever still lacks a mask gets none
            try:
                return merge_cond_passes([(p, executor(model, p, x_in, timestep, model_options)) for p in passes],
                                         x_in, timestep)
            finally:
                self.reordered = False

    def _names(self) -> str:
        return " and ".join(f"'{c.name}'" for c, s in zip(self.concepts, self.sessions, strict=True) if s is not None)

    def wrapper(self, executor, *args, **kwargs):
        options = unet_call_arg(args, kwargs, "transformer_options", {}, self.call_args)
        sigma = None
        if any(c.sigma_window for c in self.concepts) and "sigmas" in options:
            sigma = float(options["sigmas"].max())  # one host sync per call, only when a window is set
        active = [Concept(c.residual, c.strength, s) for c, s in zip(self.concepts, self.sessions, strict=True)
                  if sigma is None or c.sigma_window is None or c.sigma_window[0] <= sigma <= c.sigma_window[1]]
        if not active:
            return executor(*args, **kwargs)
        uuids = options.get("uuids")
        x = unet_call_arg(args, kwargs, "x", order=self.call_args)
        layout = CallLayout(options.get("cond_or_uncond"), unet_call_arg(args, kwargs, "context", order=self.call_args),
                            [self.frames.get(u) for u in uuids] if uuids else None, self.latent, tuple(x.shape[-2:]))
        with attach(executor.class_obj, active, call=layout, family=self.family, targets=self.targets) as attached, \
                attention_override(options, attached.attention_override):
            if not self.reordered and any(c.lag is not None and c.lag.waiting for c in active):
                raise _LagFirst
            return executor(*args, **kwargs)


def _sessions(concepts: list[LagConcept], clip, prompt: str, positive) -> list[LagSession | None]:
    """A LAG session per concept in LAG mode, with the positions of its words in this prompt and their
    encoded tokens in `positive` (how the session recognises the prompt in a UNet call)."""
    tokenize, sessions = tokenizer_of(clip), []
    tokens = positive[0][0][0]
    for c in concepts:
        if c.rule is None:
            sessions.append(None)
            continue
        try:
            found = locate_concept(tokenize, prompt, c.identifier, c.class_word)
        except ResidualError as e:
            if len(concepts) == 1:
                raise
            raise ResidualError(f"Concept '{c.name}' of this LAG chain: {e} The prompt of the chain's last LAG node "
                                "must name every concept of the chain.") from None
        sessions.append(LagSession(found.positions, found.prompt_tokens, *c.rule,
                                   embeddings=tokens[found.positions].float().clone(), strategy=c.strategy))
    return sessions


def mask_and_window_inputs(what: str, outside: str) -> list:
    """The LAG settings LAG Sampler and LAG LoRA share: how attention becomes a mask, and when it applies."""
    return [
        io.Combo.Input("mask_rule", options=list(MASK_RULES), default="max_fraction", tooltip="How attention "
                       "becomes a mask: max_fraction (>= value x the max), median or mean (above the image's median / "
                       "mean), soft (graded: (attention / max) ^ value)."),
        io.Float.Input("mask_value", default=0.5, min=0.01, max=10.0, step=0.01, tooltip="max_fraction: the "
                       "fraction of the max (0.5); soft: the exponent (1 = linear); unused by median and mean."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip=f"Apply {what} from this point of the sampling schedule..."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip=f"...up to this point. {outside}"),
        io.Combo.Input("mask_strategy", options=list(MASK_STRATEGIES), default=DEFAULT_MASK_STRATEGY, optional=True,
                       tooltip="Which attention map makes the mask. per_block: each block's own, every step. shared: "
                       "one map for all blocks (their mean, from the previous step). lorashop: the last block's, for all "
                       "blocks. freefuse: one early block's at step 4, then fixed (no residual before it). +ema: smoothed "
                       "over steps. warmup (default; least bleeding between concepts in the README's measurement): "
                       "per_block with no residual in the first 3 of every 25 steps (12% of the schedule; warmup8: 8 "
                       "of 25) while the layout settles. +bias (several concepts, SD): each concept's words are not "
                       "attended inside the others' masks (FreeFuse v2's idea; in the README's measurement it did not "
                       "reduce bleeding). With several concepts the masks never overlap. All cost one model pass per "
                       "step."),
    ]


class LagSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualLAGSampler",
            display_name="LAG Sampler",
            category=CATEGORY,
            description=(
                "Apply a personalized residual for the stock KSampler. LAG mode applies it regionally, only where "
                "the concept's identifier and class word attend in each transformer block, so the rest of the image "
                "keeps the base model's prior; global mode applies it everywhere, like a LoRA loader. Connect both "
                "outputs to the KSampler; the prompt is typed here once."
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
                *mask_and_window_inputs("the residual", "Outside, the base model samples alone."),
            ],
            outputs=[
                io.Model.Output("lag_model", display_name="model", tooltip="The model with the residual; the input MODEL "
                                "is unchanged."),
                io.Conditioning.Output("positive", display_name="positive", tooltip="The encoded prompt: the "
                                       "KSampler's positive input (LAG locates the concept's tokens in it)."),
            ],
        )

    @classmethod
    @in_ui_words
    def execute(cls, model, residual, clip, prompt, strength, mode, mask_rule, mask_value, start_percent,
                end_percent, mask_strategy=LEGACY_STRATEGY) -> io.NodeOutput:
        if mode not in MODES:
            raise ResidualError(f"mode must be one of {MODES}, got {mode!r}.")
        check_settings(strength, start_percent, end_percent, mask_rule, mask_value, mask_strategy)
        check_companions(model, family_of(model), clip)
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
        concept = LagConcept(residual, meta.identifier, meta.class_word, strength,
                             (mask_rule, mask_value) if mode == "LAG" else None, sigma_window(model, start_percent, end_percent),
                             mask_strategy)
        return io.NodeOutput(*with_concept(model, concept, clip, prompt, targets))


def check_settings(strength, start_percent, end_percent, mask_rule, mask_value,
                   mask_strategy: str = LEGACY_STRATEGY) -> None:
    """The settings every LAG node shares, checked before anything runs."""
    check_range("strength", strength, -4, 4, "1 applies it as trained.")
    check_range("start_percent", start_percent, 0, 1)
    check_range("end_percent", end_percent, 0, 1)
    if start_percent > end_percent:
        raise ResidualError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}).")
    check_rule(mask_rule, mask_value)
    check_strategy(mask_strategy)


def sigma_window(model, start_percent: float, end_percent: float) -> tuple[float, float] | None:
    """(low, high) sigma of the steps a concept applies in, or None for every step."""
    if start_percent <= 0 and end_percent >= 1:
        return None
    sampling = model.get_model_object("model_sampling")
    return sampling.percent_to_sigma(end_percent), sampling.percent_to_sigma(start_percent)


def with_concept(model, concept: LagConcept, clip, prompt: str, targets):
    """(a clone of `model` whose LAG patch holds the chain's earlier concepts and this one, located in
    `prompt`; `prompt` encoded by `clip`: the KSampler's positive)."""
    earlier = model.get_attachment(PATCH_KEY)  # concepts of LAG nodes earlier in the chain
    concepts = [*(earlier.concepts if earlier else []), concept]
    positive = encode_prompt(clip, prompt)
    patch = LagPatch(concepts, _sessions(concepts, clip, prompt, positive), family_of(model), targets)
    m = model.clone()  # the input MODEL keeps its own patch; this clone's replaces it
    m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, PATCH_KEY)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, PATCH_KEY, patch.wrapper)
    m.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, PATCH_KEY)
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, PATCH_KEY, patch.calc_cond_batch)
    m.remove_callbacks_with_key(CallbacksMP.ON_PRE_RUN, PATCH_KEY)
    m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, PATCH_KEY, patch.on_pre_run)
    m.set_attachments(PATCH_KEY, patch)
    return m, positive


class LagMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualLAGMaskPreview",
            display_name="LAG Mask Preview",
            category=CATEGORY,
            description="Show the regions where LAG applied the residuals and LoRAs in the last sampling run: each concept's "
                        "mask averaged over blocks and steps, tinted over the images (or on black) in one colour per "
                        "concept, in the order of the chain of LAG nodes: red, blue, green, yellow, magenta, cyan.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of the LAG Sampler or LAG LoRA that the KSampler used."),
                io.Latent.Input("latent", tooltip="The KSampler's output: runs this node after sampling."),
                io.Image.Input("images", optional=True, tooltip="The decoded images, to draw the mask over them."),
            ],
            outputs=[
                io.Image.Output("mask_preview", display_name="mask_preview",
                                tooltip="Red: where the residual applied (fraction of steps and blocks)."),
            ],
        )

    @classmethod
    @in_ui_words
    def execute(cls, model, latent, images=None) -> io.NodeOutput:
        patch = model.get_attachment(PATCH_KEY)
        if patch is None:
            raise ResidualError("LAG Mask Preview: this MODEL has no LAG patch; connect the model output of the LAG "
                                "Sampler or LAG LoRA.")
        masks = [s.mean_masks() for s in patch.sessions if s is not None]
        if not any(masks):
            raise ResidualError("LAG Mask Preview: no masks were recorded. Sample with this MODEL first (mode LAG, "
                                "with the LAG Sampler's positive conditioning).")
        preview = mask_preview(masks, tuple(latent["samples"].shape[-2:]), images=images)
        return io.NodeOutput(preview, ui=ui.PreviewImage(preview, cls=cls))
