"""The second base model's world: objects with patterns their captions name, rendered in batches exactly as
the concepts' own painter draws them, read by the oracle, and a pretraining run that resumes exactly."""

import json
import random

import pytest
import torch
from personalized_residuals.bench import pretrain
from personalized_residuals.bench.world import oracle
from personalized_residuals.bench.world.concepts import Concept, pattern_colors
from personalized_residuals.bench.world.model import WorldModel
from personalized_residuals.bench.world.scenes import MAX_WORDS, SHAPES, random_scene, render, shape_mask
from personalized_residuals.bench.world.text import tokenize
from safetensors.torch import load_file


def patterned_scenes(n=300, seed=0):
    rng = random.Random(seed)
    return [random_scene(rng, pattern_rate=0.5) for _ in range(n)]


def test_batched_render_paints_each_pattern_as_the_per_object_painter_does():
    scenes = [s for s in patterned_scenes() if any(o.pattern for o in s.objects)][:100]
    assert len(scenes) == 100
    images = render(scenes)
    for image, scene in zip(images, scenes, strict=True):
        for o in scene.objects:
            if o.pattern is None:
                continue
            t = lambda v: torch.tensor(v)  # noqa: E731
            mask = shape_mask(t(SHAPES.index(o.shape)), t(o.cx), t(o.cy), t(o.r))
            others = [shape_mask(t(SHAPES.index(p.shape)), t(p.cx), t(p.cy), t(p.r)) for p in scene.objects if p is not o]
            mine = mask & ~torch.stack(others).any(0) if others else mask  # where no other object overlaps
            assert torch.equal(image[:, mine], pattern_colors(o, scene.background)[:, mine])


def test_pattern_captions_fit_the_text_encoder_and_name_each_pattern():
    scenes = patterned_scenes(2000, seed=1)
    described = [s for s in scenes if any(o.pattern and o.say_pattern for o in s.objects) and s.caption]
    assert len(described) > 500
    for s in scenes:
        assert len(s.caption.split()) <= MAX_WORDS
        tokenize(s.caption)
    assert any("checkered" in s.caption for s in described) and any("hollow" in s.caption for s in described)


def test_the_oracle_reads_patterned_objects_as_their_pattern():
    scenes = [s for s in patterned_scenes(400, seed=2) if len(s.objects) == 1 and s.objects[0].pattern]
    readings = oracle.read_images(render(scenes))
    scores = [oracle.identity(r, Concept("asked", s.objects[0].shape, s.objects[0].pattern))[0]
              for r, s in zip(readings, scenes, strict=True)]
    assert min(scores) >= oracle.IDENTITY_HIT


def test_the_first_base_model_refuses_pattern_words_by_name():
    model = WorldModel.load()
    with pytest.raises(ValueError, match="checkered"):
        model.text.encode(["a red and yellow checkered square"])


def test_a_paused_and_resumed_pretraining_run_ends_as_an_uninterrupted_one(tmp_path):
    common = ["--patterns", "--steps", "4", "--batch", "4", "--pool", "64", "--eval-every", "100", "--smoke",
              "--device", "cpu"]
    pretrain.main([*common, "--out", str(tmp_path / "straight.safetensors")])
    pretrain.main([*common, "--out", str(tmp_path / "paused.safetensors"), "--stop-at", "3"])
    assert json.loads((tmp_path / "paused.resume.json").read_text())["step"] == 3
    pretrain.main([*common, "--out", str(tmp_path / "paused.safetensors"), "--resume"])
    straight, paused = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("straight", "paused"))
    assert straight.keys() == paused.keys() and all(torch.equal(straight[k], paused[k]) for k in straight)
    meta = json.loads((tmp_path / "paused.json").read_text())
    assert meta["steps"] == 4 and meta["patterns"] and "pattern_identity" in meta["fidelity"]
