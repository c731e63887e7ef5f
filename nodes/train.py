"""Train Personalized Residual: concept photos in, a RESIDUAL and its loss curve out."""

from __future__ import annotations

import logging
import time

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..residual_core import (
    DEFAULT_RESOLUTION,
    INITS,
    MASK_MARKS,
    MAX_SIDE,
    MIN_SIDE,
    ResidualError,
    ResidualMeta,
    ResidualSet,
    TrainConfig,
    check_range,
    family_label,
    identifier_warnings,
    locate_concept,
    mask_warnings,
    model_family,
    native_resolution,
    photo_prompts,
    photo_warnings,
    square_batch,
    square_masks,
    train_residual,
)
from . import samples
from .advice import in_ui_words
from .comfy_model import base_hash, check_companions, encode_prompt, family_of, prediction_of, tokenizer_of, unet_of
from .pictures import loss_curve, loss_curve_picture
from .precision import autocast_dtype, compute_dtype, loss_scaler, training_attention
from .residual_type import CATEGORY, Residual
from .samples import CFG, MAX_SAMPLE_COLUMNS, SAMPLE_SIZE

ON_CANCEL = ("discard", "keep")
PREVIEW_EVERY = 10  # steps between the loss-curve previews sent to the node while training runs


def preview_every(steps: int) -> int:
    """Steps between live loss-curve previews: PREVIEW_EVERY, or half the run (at least one preview) when shorter."""
    return max(1, min(PREVIEW_EVERY, steps // 2))


def training_resolution(resolution: int, family: str, prediction: str) -> int:
    """The resolution input, with 0 meaning the family's native one (512 for a UNet of no known family)."""
    if resolution:
        return resolution
    native = native_resolution(family, prediction)
    if native is None:
        logging.warning("Train Personalized Residual: resolution 0 (native), but this UNet is of no known family (%s): "
                        "training at %d px. Set the resolution to the model's own.", family, DEFAULT_RESOLUTION)
        return DEFAULT_RESOLUTION
    logging.info("Train Personalized Residual: training at %s's native %d px.", family_label(family), native)
    return native


def _cond_key(k: int) -> str:
    """The guider's name for the k-th distinct training prompt (the first is the usual 'positive')."""
    return "positive" if k == 0 else f"positive_{k}"


class _PositiveOnlyGuider(comfy.samplers.CFGGuider):
    def set_conds(self, prompts):
        """prompts: one CONDITIONING per distinct training prompt; ComfyUI prepares each as it does a positive."""
        self.inner_set_conds({_cond_key(k): cond for k, cond in enumerate(prompts)})


class _TrainingRun(comfy.samplers.Sampler):
    """A 'sampler' that trains. Running it through a guider lets ComfyUI do what it does for sampling
    (load the model to its device, prepare the conditioning, SDXL's size embedding included) before
    handing over the model; the loop itself is residual_core.train_residual."""

    def __init__(self, residual, config, family, targets, flipped_latents, on_step, prompts, masks):
        self.residual, self.config, self.family, self.targets = residual, config, family, targets
        self.flipped, self.on_step = flipped_latents, on_step
        self.prompts, self.masks = prompts, masks  # PhotoPrompts; subject masks [N, H, W] or None
        self.losses = None
        self.scaler = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        base = model_wrap.inner_model
        prediction = prediction_of(base)
        # The training pass only: attention kernels with no backward pass are swapped for one with it.
        model_options = {**extra_args["model_options"]}
        model_options["transformer_options"] = training_attention(model_options.get("transformer_options", {}))
        conds = [model_wrap.conds[_cond_key(k)] for k in range(len(self.prompts.texts))]
        schedule = base.model_sampling.sigmas.to(latent_image.device, torch.float32)
        autocast = autocast_dtype(latent_image.device)
        self.scaler = loss_scaler(base, autocast)
        logging.info("Train Personalized Residual: the diffusion model computes in %s%s; the residual and its optimiser "
                     "in float32.",
                     str(autocast or compute_dtype(base)).removeprefix("torch."),
                     ", with loss scaling" if self.scaler is not None else "")

        def denoise(x_t, t, k):  # x_t, integer t, prompt k -> the raw eps / v / velocity, via ComfyUI's model call
            s = schedule[t].view(-1, 1, 1, 1)
            if prediction == "flow":  # x_t = (1 - s) x0 + s eps is the model's input; denoised = x_t - s * velocity
                return (x_t - comfy.samplers.calc_cond_batch(base, [conds[k]], x_t, schedule[t], model_options)[0]) / s
            x = x_t * (s * s + 1).sqrt()
            denoised = comfy.samplers.calc_cond_batch(base, [conds[k]], x, schedule[t], model_options)[0]
            if prediction == "eps":
                return (x - denoised) / s
            return (x / (s * s + 1) - denoised) * (s * s + 1).sqrt() / s

        flipped = None if self.flipped is None else base.process_latent_in(self.flipped.to(latent_image.device))
        self.losses = train_residual(
            self.residual, base.diffusion_model, self.prompts.denoiser(denoise), latent_image,
            schedule if prediction == "flow" else 1 / (1 + schedule**2),
            prediction, self.config, flipped, self.on_step, autocast, targets=self.targets, scaler=self.scaler,
            masks=self.masks, family=self.family,
        )
        if self.scaler is not None and self.scaler.skipped:
            logging.info("Train Personalized Residual: %d of %d steps skipped for float16 gradient overflow (loss scale "
                         "now %g).", self.scaler.skipped, self.config.steps, self.scaler.scale)
        return latent_image


class TrainPersonalizedResidual(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizedResidualTrain",
            display_name="Train Personalized Residual",
            category=CATEGORY,
            description=(
                "Personalize Stable Diffusion (or Flux.1): teach the model a new concept from a few photos, as "
                "DreamBooth does, by training small LoRA-style low-rank residuals on the output projection of every "
                "transformer block (Personalized Residuals, Ham et al., CVPR 2024). The model itself is not changed."
            ),
            is_input_list=True,  # photos of different sizes may arrive as a list (e.g. from a folder loader)
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (SD1.x, SD2.x, SDXL or Flux.1). It stays "
                               "unchanged."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the training prompt once."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the photos once."),
                io.Image.Input("images", tooltip="Photos of the concept (4-6 is typical): a batch, or a list of "
                               "photos of different sizes. Each is resized and centre-cropped to the resolution."),
                io.String.Input("class_word", default="dog", tooltip="The concept's class, as you would write it in "
                                "a prompt: 'dog', 'backpack', 'guitar amplifier'. LAG later masks by this word."),
                io.String.Input("identifier", default="sks", tooltip="A rare word that names this particular concept "
                                "in prompts. Training uses the prompt 'a photo of a {identifier} {class_word}'."),
                io.Int.Input("steps", default=150, min=1, max=10000, tooltip="Optimiser steps (paper: 150)."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6,
                               tooltip="AdamW learning rate, constant (paper: 1e-3)."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Photos per step (paper: 4); photos "
                             "are cycled so each is seen equally often."),
                io.Float.Input("rank_fraction", default=0.05, min=0.005, max=1.0, step=0.005, tooltip="Residual rank "
                               "as a fraction of each layer's width (paper: 0.05, i.e. ranks 16/32/64 on SD1.5)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed for the residual init and every random draw of training: same seed and "
                             "inputs, same residual (so it stays fixed between runs, unlike a sampler's seed)."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=64, tooltip="Training resolution in "
                             "pixels. 0: the model's native one (512 for SD1.x and SD2.x-base, 768 for SD2.x-v, 1024 "
                             "for SDXL and Flux.1)."),
                io.Boolean.Input("flip", default=False, tooltip="Also train on horizontally flipped photos. Leave "
                                 "off for asymmetric concepts (text, logos)."),
                io.Combo.Input("init", options=list(INITS), default="zero", tooltip="zero: the untrained residual "
                               "changes nothing (LoRA-style). random: both factors random, as in the paper."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute activations in the "
                                 "backward pass instead of storing them: less memory, about a third slower. Turn on "
                                 "if training runs out of memory (large resolutions, SDXL, small GPUs)."),
                io.Combo.Input("on_cancel", options=list(ON_CANCEL), default="discard", tooltip="What Cancel "
                               "does mid-training. discard: stop, output nothing (nodes after this one don't run). "
                               "keep: stop and output the residual trained so far, so Save Residual after it still "
                               "runs; the loss curve's title and the log say at which step it stopped, and the "
                               "file's metadata records the steps done."),
                Residual.Input("resume_from", optional=True, tooltip="Optional: a residual to train further (e.g. "
                               "from Load Residual) instead of starting from a new one. It must be for this model's "
                               "family, with the same rank_fraction, class_word and identifier. The file's metadata "
                               "then records the total steps and each run's steps and learning rate (lr_history). "
                               "The optimiser's state (AdamW's moments) is not saved in residual files, so it starts "
                               "afresh; the seed draws the same timesteps and noise as a first run with that seed."),
                io.String.Input("sample_prompts", multiline=True, default="", optional=True,
                                placeholder="sample prompts, one per line (empty: the training prompt)", tooltip="Prompts to "
                                "render after training, one per line, each by the base model and with the residual "
                                "(LAG Sampler's way, at the same seed), into the samples grid. Empty: the training "
                                "prompt. A prompt without the identifier and class word gets a warning and is "
                                "rendered with the residual applied everywhere."),
                io.Int.Input("sample_every", default=0, min=0, max=10000, optional=True, tooltip="Also render the "
                             "residual as it was every this many steps (a column each). 0: only at the end."),
                io.Int.Input("sample_steps", default=20, min=0, max=100, optional=True, tooltip="Sampling steps per "
                             f"sample image (euler, cfg {CFG:g}; Flux: 1, guidance-distilled; {SAMPLE_SIZE} px or the "
                             "training resolution if smaller, seed = the training seed). 0: no samples."),
                io.Mask.Input("masks", optional=True, tooltip="Optional: one subject mask per photo, same order and "
                              "size as the photos (a MASK batch, or a list). The loss then counts only the subject "
                              "(plus a band of 8 px at SD's scale around it), so the residual stops learning the "
                              "photos' backgrounds. Set mask_marks to what the masks' white (1) marks. Not "
                              "connected: the whole photo."),
                io.Combo.Input("mask_marks", options=list(MASK_MARKS), default="subject", optional=True,
                               tooltip="What the masks' 1 (white) marks. subject: segmentation nodes (SAM, BiRefNet, "
                               "background removers). background: Load Image's MASK of a cut-out PNG (it is 1 - "
                               "alpha: 1 where the picture is transparent). Ignored without masks."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                placeholder="captions, one per photo, each with the identifier and class word (empty: "
                                "'a photo of a {identifier} {class_word}')", tooltip="Optional: a caption "
                                "per photo, one per line in the photos' order (or connect a list of strings, such as "
                                "the texts of Load Image and Text Dataset from Folder). Each must contain the "
                                "identifier and class word, e.g. 'a photo of a sks dog on a red sofa'. Empty: "
                                "every photo trains with 'a photo of a {identifier} {class_word}'."),
            ],
            outputs=[
                Residual.Output("residual", display_name="residual",
                                tooltip="The trained residual: connect to LAG Sampler or Save Residual."),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="Training loss per step (and its moving average) as a picture."),
                io.Image.Output("samples", display_name="samples", tooltip="The sample prompts (rows) by the base "
                                "model and by the residual at each sampled step (columns), as one labelled picture."),
            ],
        )

    @classmethod
    @in_ui_words
    def execute(cls, model, clip, vae, images, class_word, identifier, steps, learning_rate, batch_size,
                rank_fraction, seed, resolution, flip, init, gradient_checkpointing=(False,), on_cancel=("discard",),
                resume_from=(None,), sample_prompts=("",), sample_every=(0,), sample_steps=(20,), masks=(None,),
                mask_marks=("subject",), captions=("",)) -> io.NodeOutput:
        # masks and captions stay lists (one per photo, or one batch / one text); every other input is one value.
        masks = [m for m in masks if m is not None]
        (model, clip, vae, class_word, identifier, steps, learning_rate, batch_size, rank_fraction, seed,
         resolution, flip, init, gradient_checkpointing, on_cancel, resume_from, sample_prompts, sample_every,
         sample_steps, mask_marks) = (
            v[0] for v in (model, clip, vae, class_word, identifier, steps, learning_rate, batch_size, rank_fraction,
                           seed, resolution, flip, init, gradient_checkpointing, on_cancel, resume_from,
                           sample_prompts, sample_every, sample_steps, mask_marks))
        # Every input is checked before the VAE, the text encoder or the UNet runs.
        for name, value in (("model", model), ("clip", clip), ("vae", vae)):
            if value is None:
                raise ResidualError(f"{name} is empty: connect the {name.upper()} output of Load Checkpoint (this "
                                    f"checkpoint may have no {name.upper()}; load one separately).")
        class_word, identifier = class_word.strip(), identifier.strip()
        if not class_word or not identifier:
            raise ResidualError("class_word and identifier must not be empty: use e.g. 'dog' and 'sks'.")
        config = TrainConfig(steps=steps, batch_size=batch_size, lr=learning_rate, seed=seed, flip=flip,
                             gradient_checkpointing=gradient_checkpointing)
        config.check()
        if on_cancel not in ON_CANCEL:
            raise ResidualError(f"on_cancel must be one of {ON_CANCEL}, got {on_cancel!r}.")
        if mask_marks not in MASK_MARKS:
            raise ResidualError(f"mask_marks must be one of {MASK_MARKS}, got {mask_marks!r}.")
        check_range("sample_every", sample_every, 0, 10000, "0: samples only at the end.")
        check_range("sample_steps", sample_steps, 0, 100, "0: no samples.")
        if sample_steps and sample_every and steps // sample_every > MAX_SAMPLE_COLUMNS:
            raise ResidualError(f"sample_every {sample_every} gives {steps // sample_every} sample columns for "
                                f"{steps} steps; at most {MAX_SAMPLE_COLUMNS}: set sample_every to at least "
                                f"{-(-steps // MAX_SAMPLE_COLUMNS)} (or 0 for samples only at the end).")
        if resolution != 0:
            check_range("resolution", resolution, MIN_SIDE, MAX_SIDE, "Use 0 for the model's native one.")
            if resolution % 8:
                raise ResidualError(f"resolution must be a multiple of 8 (the VAE's scale), got {resolution}.")
        family = family_of(model)  # refuses a model of another family by name
        check_companions(model, family, clip, vae)
        targets = family.targets(unet_of(model))
        prediction = prediction_of(model.model)
        resolution = training_resolution(resolution, model_family(targets), prediction)
        prompt = f"a photo of a {identifier} {class_word}"
        tokenize = tokenizer_of(clip)
        locate_concept(tokenize, prompt, identifier, class_word)  # both words tokenize and are found
        pixels = square_batch(images, resolution)
        subject = square_masks(masks, images, resolution, mask_marks) if masks else None  # [N, size, size]
        training_prompts = photo_prompts(captions, len(pixels), prompt, tokenize, identifier, class_word)
        captions_given = any(str(c).strip() for c in captions)
        prompts = samples.sample_prompts(sample_prompts or "", identifier, class_word) if sample_steps else []
        warnings = (photo_warnings(images, resolution) + (mask_warnings(masks, mask_marks) if masks else [])
                    + identifier_warnings(identifier, class_word)
                    + samples.prompt_warnings(prompts, clip, identifier, class_word))
        for line in warnings:
            logging.warning("Train Personalized Residual: %s", line)
        with torch.inference_mode(False):  # a trainable residual can't be made of inference tensors
            if resume_from is None:
                meta = ResidualMeta(class_word=class_word, identifier=identifier, seed=seed, batch_size=batch_size,
                                    weight_decay=config.weight_decay)
                residual = ResidualSet.for_targets(targets, rank_fraction, init, seed, meta)
            else:
                residual = resume_from.continued(targets, rank_fraction, "resume_from")
                meta = residual.meta
                if (meta.class_word, meta.identifier) != (class_word, identifier):
                    raise ResidualError(f"resume_from was trained as '{meta.identifier} {meta.class_word}', not "
                                        f"'{identifier} {class_word}': set class_word and identifier to its own.")
                meta.seed, meta.batch_size, meta.weight_decay = seed, batch_size, config.weight_decay

        # Fixed for the whole run, so encoded once: the photos (and their mirror images) and each distinct prompt.
        latents = vae.encode(pixels)
        flipped = vae.encode(pixels.flip(2)) if flip else None
        positives = [encode_prompt(clip, text) for text in training_prompts.texts]
        if not all(bool(torch.isfinite(t).all()) for t in (latents, *(p[0][0] for p in positives),
                                                            *([flipped] if flip else []))):
            raise ResidualError("The VAE or the text encoder returned NaN or inf for the photos or the prompt. A VAE "
                                "in float16 can overflow (SDXL's original VAE does): start ComfyUI with --fp32-vae or "
                                "use a fixed VAE.")

        pbar = comfy.utils.ProgressBar(steps)
        title = f"{identifier} {class_word}"
        so_far = {}
        snapshots = samples.Snapshots(sample_every if prompts else 0, steps)
        every = preview_every(steps)

        def on_step(step, losses):
            so_far["losses"] = losses
            snapshots.after_step(step, residual)
            if (step + 1) % every == 0 and step + 1 < steps:  # the loss curve so far, on the node
                pbar.update_absolute(step + 1, steps, ("PNG", loss_curve_picture(losses.tolist(), title), 640))
            else:
                pbar.update(1)
            comfy.model_management.throw_exception_if_processing_interrupted()

        started = time.perf_counter()
        stopped = None  # the steps done when Cancel stopped a run with on_cancel "keep"
        try:
            with torch.inference_mode(False):
                meta.base_hash = base_hash(model, targets)
                run = _TrainingRun(residual, config, family, targets, flipped, on_step, training_prompts, subject)
                guider = _PositiveOnlyGuider(model)
                guider.set_conds(positives)
                guider.sample(torch.zeros_like(latents), latents, run, torch.ones(1), disable_pbar=True, seed=seed)
            losses = run.losses
        except comfy.model_management.InterruptProcessingException:
            losses = so_far.get("losses")
            if on_cancel != "keep" or losses is None:
                raise
            losses = losses.cpu()
            if not (torch.isfinite(losses).all() and all(bool(torch.isfinite(p).all()) for p in residual.parameters())):
                logging.warning("Train Personalized Residual: cancelled, and the residual trained so far is not "
                                "finite (the loss diverged): nothing is kept.")
                raise
            stopped = len(losses)
            # ComfyUI's flag was cleared when the exception was raised; cleared again in case Cancel was pressed
            # twice, so that the nodes after this one (Save Residual) run.
            comfy.model_management.interrupt_current_processing(False)
        residual.cpu()
        meta.add_run(len(losses), learning_rate)
        if stopped is not None:
            title += f" (cancelled: stopped at step {stopped} of {steps}, kept)"
            logging.warning("Train Personalized Residual: cancelled at step %d of %d; on_cancel is 'keep', so the "
                            "residual trained so far is the output (its metadata records %d steps).", stopped, steps,
                            meta.steps)
        trained = time.perf_counter() - started
        grid, sampled = torch.ones(1, 64, 64, 3), ""  # no samples: a blank picture
        if prompts:
            started = time.perf_counter()
            try:
                grid = samples.render(model, clip, vae, residual, targets, prompts, snapshots.kept, len(losses),
                                      min(SAMPLE_SIZE, resolution), sample_steps, seed)
                sampled = (f"; samples in {time.perf_counter() - started:.1f} s ({len(prompts)} prompt(s) x "
                           f"{len(snapshots.kept) + 2} columns, {sample_steps} steps)")
            except comfy.model_management.InterruptProcessingException:
                if on_cancel != "keep":
                    raise
                comfy.model_management.interrupt_current_processing(False)
                sampled = "; samples cancelled"
                logging.warning("Train Personalized Residual: cancelled while rendering the samples; on_cancel is "
                                "'keep', so the trained residual is the output, without samples.")
        logging.info(
            "Personalized residual '%s %s': %d steps on %d photos%s in %.1f s%s, %d parameters, loss %.4f -> %.4f%s",
            identifier, class_word, len(losses), len(pixels),
            "".join([" with subject masks" if subject is not None else "",
                     f", {len(training_prompts.texts)} distinct caption(s)" if captions_given else ""]),
            trained, sampled, residual.num_parameters(),
            float(losses[0]), float(losses[-min(10, len(losses)):].mean()),
            f" (trained further: {meta.steps} steps in all, {meta.lr_history})" if resume_from is not None else "",
        )
        return io.NodeOutput(residual, loss_curve(losses.tolist(), title, warnings), grid)
