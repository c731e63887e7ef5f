"""Samples while training: the sample prompts rendered by the base model and by the residual at the sampled steps, as
one labelled grid, with the base model and the trained residual left as they are."""

import logging
import time

import comfy.model_management
import pytest
import torch
from comfy_env import counted_encodes, train, weights_hash
from personalized_residuals.nodes import samples
from personalized_residuals.residual_core import ResidualError

IMAGES = [torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))]
PROMPTS = "a photo of a sks dog on the beach\na photo of a dog in the snow"


def _flat(residual):
    return torch.cat([p.detach().flatten() for p in residual.parameters()])


def test_the_samples_grid_has_a_row_per_prompt_and_a_column_per_sampled_step(sd15, clip, vae, monkeypatch, caplog):
    drawn = []
    grid_of = samples.sample_grid

    def record(rows, row_labels, column_labels):
        drawn.append((rows, list(row_labels), list(column_labels)))
        return grid_of(rows, row_labels, column_labels)

    monkeypatch.setattr(samples, "sample_grid", record)
    before = weights_hash(sd15)
    with caplog.at_level(logging.INFO):
        residual, curve, grid = train(sd15, clip, vae, IMAGES, steps=4, learning_rate=1e-2, sample_prompts=PROMPTS,
                                      sample_every=2, sample_steps=4)
    (rows, row_labels, column_labels), = drawn
    assert row_labels == PROMPTS.splitlines() and column_labels == ["base", "step 2", "step 4"]
    assert [len(r) for r in rows] == [3, 3] and all(c.shape == (64, 64, 3) for r in rows for c in r)
    assert grid.shape[0] == 1 and grid.shape[2] == 3 * 96 and grid.shape[1] > 2 * 64, "3 columns of 96 px, 2 rows"
    for row in rows:
        assert not torch.equal(row[0], row[2]), "the residual's column differs from the base's"
    assert "the sample prompt 'a photo of a dog in the snow' lacks 'sks dog'" in caplog.text
    assert "samples in" in caplog.text and "2 prompt(s) x 3 columns" in caplog.text
    assert curve.shape[1] > 360, "the warning is shown on the loss curve too"
    assert weights_hash(sd15) == before, "the base model is bit-identical after training and sampling"
    plain = train(sd15, clip, vae, IMAGES, steps=4, learning_rate=1e-2, sample_steps=0)
    assert torch.equal(_flat(residual), _flat(plain[0])), "sampling leaves the trained residual as it was"
    assert plain[2].shape == (1, 64, 64, 3), "no samples: a blank picture"
    with pytest.raises(ResidualError, match="sample_every 1 gives 17 sample columns for 17 steps; at most 16: set "
                                            "sample_every to at least 2"):
        train(sd15, clip, vae, IMAGES, steps=17, sample_every=1, sample_steps=4)


def test_the_text_encoder_runs_once_a_prompt_whatever_the_grids_columns(sd15, clip, vae, monkeypatch):
    counting, calls = counted_encodes(clip, monkeypatch)
    train(sd15, counting, vae, IMAGES, steps=4, sample_prompts=PROMPTS, sample_every=2, sample_steps=1)  # 3 columns
    assert len(calls) == 1 + 1 + len(PROMPTS.splitlines()), "training's prompt, the negative, each sample prompt"
    counting, calls = counted_encodes(clip, monkeypatch)
    train(sd15, counting, vae, IMAGES, steps=4, sample_steps=1)
    assert len(calls) == 1 + 1, "training's prompt, the negative: the default sample prompt is training's"


def test_default_samples_render_the_training_prompt_only_at_the_end(sd15, clip, vae, monkeypatch):
    drawn = []
    grid_of = samples.sample_grid
    monkeypatch.setattr(samples, "sample_grid", lambda *a: drawn.append(a) or grid_of(*a))
    started = time.perf_counter()
    train(sd15, clip, vae, IMAGES, steps=4, sample_steps=20, sample_prompts="", sample_every=0)  # the defaults
    print(f"training + default samples: {time.perf_counter() - started:.2f} s")
    (rows, row_labels, column_labels), = drawn
    assert list(row_labels) == ["a photo of a sks dog"] and list(column_labels) == ["base", "step 4"]


def test_cancel_while_sampling_keeps_the_trained_residual_with_keep_and_nothing_with_discard(sd15, clip, vae,
                                                                                             monkeypatch):
    calls = []

    def cancel_in_the_first_sampling_step():  # ComfyUI's check: once per training step, then per sampling step
        calls.append(1)
        if len(calls) == 3:
            comfy.model_management.interrupt_current_processing(True)
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted",
                        cancel_in_the_first_sampling_step)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(sd15, clip, vae, IMAGES, steps=2, sample_steps=4)
    comfy.model_management.interrupt_current_processing(False)
    calls.clear()
    residual, _, grid = train(sd15, clip, vae, IMAGES, steps=2, sample_steps=4, on_cancel="keep")
    assert len(calls) == 3, "stopped in the first sampling step"
    assert residual.meta.steps == 2 and grid.shape == (1, 64, 64, 3), "the residual, and a blank picture"
    assert not comfy.model_management.processing_interrupted()
