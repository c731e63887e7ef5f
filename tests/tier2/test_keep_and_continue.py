"""Keep and continue: Cancel with on_cancel "keep" outputs the residual trained so far (and Save Residual after it
runs), a residual trains further from where it stopped, and the loss curve is previewed on the node while training
runs."""

import logging

import comfy.model_management
import comfy.utils
import pytest
import torch
from comfy_env import run, train, weights_hash
from personalized_residuals.nodes import train as train_node
from personalized_residuals.nodes.files import LoadResidual, SaveResidual
from personalized_residuals.residual_core import ResidualError, fileformat
from PIL import Image

IMAGES = [torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))]


def _train(model, clip, vae, **overrides):
    return train(model, clip, vae, IMAGES, **overrides)


def _flat(residual):
    return torch.cat([p.detach().flatten() for p in residual.parameters()])


def _cancel_at(monkeypatch, k):
    """Cancel pressed during step k: ComfyUI's check raises there (and the flag stays set, as a second press leaves
    it), counted per call of throw_exception_if_processing_interrupted (once per training step)."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) == k:
            comfy.model_management.interrupt_current_processing(True)
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", check)
    return calls


def test_cancel_with_keep_outputs_the_residual_so_far_and_save_residual_writes_its_steps(
        sd15, clip, vae, loras_dir, monkeypatch, caplog):
    before = weights_hash(sd15)
    full = _flat(_train(sd15, clip, vae, steps=8)[0])
    calls = _cancel_at(monkeypatch, 3)
    with caplog.at_level(logging.INFO):
        residual, curve, _ = _train(sd15, clip, vae, steps=8, on_cancel="keep")
    assert len(calls) == 3, "stopped within the step Cancel was pressed in"
    assert not comfy.model_management.processing_interrupted(), "cleared, so that the nodes after it run"
    kept = _flat(residual)
    assert kept.abs().sum() > 0, "trained: zero init's up factors moved"
    assert not torch.equal(kept, full), "not the full run"
    assert (residual.meta.steps, residual.meta.lr_history) == (3, "3@0.001")
    assert "cancelled at step 3 of 8" in caplog.text
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert weights_hash(sd15) == before
    name = run(SaveResidual, residual, "")[0]
    saved = fileformat.load(str(loras_dir / name))
    assert (saved.meta.steps, saved.meta.lr_history) == (3, "3@0.001"), "the steps done land in the file"
    assert torch.equal(_flat(saved), kept)


def test_cancel_with_discard_still_outputs_nothing(sd15, clip, vae, monkeypatch):
    _cancel_at(monkeypatch, 2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _train(sd15, clip, vae, steps=8)  # on_cancel defaults to discard
    comfy.model_management.interrupt_current_processing(False)


def test_training_continues_from_a_saved_residual_and_records_the_learning_rate_history(sd15, clip, vae, loras_dir):
    first = _train(sd15, clip, vae, steps=4)[0]
    name = run(SaveResidual, first, "")[0]
    loaded = run(LoadResidual, name.split("/", 1)[1])[0]  # Load Residual lists names inside its folder
    loaded_before = _flat(loaded).clone()
    continued = _train(sd15, clip, vae, steps=4, learning_rate=5e-4, resume_from=loaded)[0]
    assert (continued.meta.steps, continued.meta.lr, continued.meta.lr_history) == (8, 5e-4, "4@0.001,4@0.0005")
    assert torch.equal(_flat(loaded), loaded_before), "the input residual is left as it was"
    assert not torch.equal(_flat(continued), loaded_before), "trained further"
    # Continued from its factors, not re-initialised: AdamW moves each factor by about the learning rate per step.
    moved = float((_flat(continued) - loaded_before).abs().max())
    assert 0 < moved <= 1.5 * 4 * 5e-4, moved
    name = run(SaveResidual, continued, "")[0]
    assert fileformat.load(str(loras_dir / name)).meta.lr_history == "4@0.001,4@0.0005"


def test_continuing_at_another_rank_family_or_concept_is_a_clear_error(sd15, sd2_v, clip, clip_sd2, vae):
    first = _train(sd15, clip, vae, steps=1)[0]
    with pytest.raises(ResidualError, match=r"resume_from has rank .* \(rank_fraction 0.25\) but rank_fraction 0.5 "
                                            r"gives rank .*set rank_fraction to 0.25"):
        _train(sd15, clip, vae, rank_fraction=0.5, resume_from=first)
    with pytest.raises(ResidualError, match="resume_from: This residual was made for"):
        _train(sd2_v, clip_sd2, vae, resume_from=first)
    with pytest.raises(ResidualError, match="resume_from was trained as 'sks dog', not 'zwx dog'"):
        _train(sd15, clip, vae, identifier="zwx", resume_from=first)


def test_the_loss_curve_is_previewed_on_the_node_every_few_steps(sd15, clip, vae, monkeypatch):
    previews = []
    update_absolute = comfy.utils.ProgressBar.update_absolute

    def record(self, value, total=None, preview=None):
        if preview is not None:
            previews.append((value, preview))
        update_absolute(self, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", record)
    _train(sd15, clip, vae, steps=2 * train_node.PREVIEW_EVERY + 1)
    assert [v for v, _ in previews] == [train_node.PREVIEW_EVERY, 2 * train_node.PREVIEW_EVERY]
    kind, picture, size = previews[0][1]
    assert kind == "PNG" and isinstance(picture, Image.Image) and picture.size[0] <= size
    previews.clear()  # a short run still shows one, halfway
    _train(sd15, clip, vae, steps=5)
    assert [v for v, _ in previews] == [2, 4]
