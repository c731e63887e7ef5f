"""After any error in training or sampling, the base model is bit-identical to before, nothing of ours is left on
it, other nodes' patches still give what they gave before, and no file is left behind."""

import comfy.model_management
import comfy.samplers
import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention
from comfy.patcher_extension import WrappersMP
from comfy_env import concept_residual, ksample, run, stock_lora, train, weights_hash
from personalized_residuals.nodes.files import SaveResidual
from personalized_residuals.nodes.lag import LagSampler
from personalized_residuals.residual_core import ResidualError, fileformat
from personalized_residuals.residual_core.errors import TrainingDiverged

import nodes as comfy_nodes

PHOTOS = [torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))]


def _train(model, clip, vae, **overrides):
    return train(model, clip, vae, PHOTOS, **{"steps": 30, **overrides})


def _lag(model, residual, clip, prompt="a photo of a sks dog"):
    return run(LagSampler, model, residual, clip, prompt, 1.0, "LAG", "max_fraction", 0.5, 0.0, 1.0)


class Reference:
    """What the model and other nodes' patches give before the error: compared bit for bit after it."""

    def __init__(self, sd15, clip, tmp_path):
        self.sd15, self.clip = sd15, clip
        self.negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        self.lag_model, self.positive = _lag(sd15, concept_residual(sd15), clip)
        other = stock_lora(sd15, concept_residual(sd15, seed=9), tmp_path, "other.safetensors")  # another node's LoRA ...
        self.replaced = []
        other.set_model_attn2_replace(self._replace, "input", 1)  # ... and attention patch
        self.other = other
        self.hash = weights_hash(sd15)
        self.samples = self._samples()

    def _replace(self, q, k, v, extra_options):
        self.replaced.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"])

    def _samples(self):
        return [ksample(m, self.positive, self.negative) for m in (self.sd15, self.other, self.lag_model)]

    def check(self):
        assert weights_hash(self.sd15) == self.hash, "the base model's weights are bit-identical"
        assert not any(m._forward_hooks for m in self.sd15.model.modules()), "no hook of ours is left"
        assert all(p.grad is None for p in self.sd15.model.parameters()), "no gradient left on the model"
        self.replaced.clear()
        for before, after in zip(self.samples, self._samples(), strict=True):
            assert torch.equal(before, after), "the model, its other patches and LAG give what they gave before"
        assert self.replaced, "the other node's attention patch ran"


@pytest.fixture
def reference(sd15, clip, tmp_path):
    return Reference(sd15, clip, tmp_path)


def test_a_nan_loss_in_comfyui_stops_training_and_leaves_everything_as_it_was(sd15, clip, vae, reference, monkeypatch):
    calls = []
    original = comfy.samplers.calc_cond_batch

    def nan_from_step_5(*args, **kwargs):  # the UNet's output turns NaN, as an fp16 overflow would
        calls.append(1)
        out = original(*args, **kwargs)
        return [o * float("nan") for o in out] if len(calls) >= 5 else out

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", nan_from_step_5)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 5.*put back to its state after step 3.*Lower "
                                               "the learning rate") as e:
        _train(sd15, clip, vae)
    assert e.value.kept_step == 3 and len(calls) == 10, "stopped at the first check"
    monkeypatch.undo()
    reference.check()


def test_an_error_inside_the_unet_mid_training_leaves_everything_as_it_was(sd15, clip, vae, reference, monkeypatch):
    original = comfy.samplers.calc_cond_batch
    calls = []

    def out_of_memory_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", out_of_memory_at_step_3)
    with pytest.raises(torch.OutOfMemoryError):
        _train(sd15, clip, vae)
    monkeypatch.undo()
    reference.check()


def test_cancel_mid_training_leaves_no_file_and_the_model_as_it_was(sd15, clip, vae, reference, loras_dir,
                                                                     monkeypatch):
    update = comfy.utils.ProgressBar.update

    def cancel_at_step_3(self, value):
        update(self, value)
        if self.current == 3:
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update", cancel_at_step_3)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _train(sd15, clip, vae)  # in a graph, Save Residual after it never runs
    monkeypatch.undo()
    assert list(loras_dir.rglob("*")) == []
    reference.check()


def test_an_interrupted_save_leaves_no_file(sd15, loras_dir, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileformat.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(SaveResidual, concept_residual(sd15), "")
    assert [p.name for p in loras_dir.rglob("*")] == ["personalized_residuals"], "an empty folder, no file"


def test_an_error_inside_lag_sampling_leaves_everything_as_it_was(sd15, clip, reference):
    long_prompt = "a photo of a " + "very " * 80 + "sks dog"  # two 77-token chunks: the concept is in the second
    lag_model, _ = _lag(sd15, concept_residual(sd15), clip, long_prompt)
    with pytest.raises(ResidualError, match="the KSampler's conditioning does not hold the words 'sks dog'"):
        ksample(lag_model, reference.positive, reference.negative)  # another prompt's conditioning: one chunk
    reference.check()


def test_another_nodes_error_or_a_cancel_mid_sampling_leaves_everything_as_it_was(sd15, clip, reference):
    calls = []

    def cancel_on_the_second_call(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise comfy.model_management.InterruptProcessingException()
        return executor(*args, **kwargs)

    m = reference.lag_model.clone()
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "another_node", cancel_on_the_second_call)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        ksample(m, reference.positive, reference.negative)
    assert len(calls) == 2
    reference.check()
