"""The evaluation world on its shipped base model: the oracle is exact, and a residual trained in under a
minute on CPU captures a concept while LAG keeps more of the rest of the image than the global residual.

Thresholds come from measured runs (see the numbers this test prints; bench/results/report.md for the
full evaluation) with a margin; they are not tuned to pass.
"""

import random

import numpy as np
import torch
from personalized_residuals.bench import methods
from personalized_residuals.bench.evaluate import concept_prompts, sample_prompts, score
from personalized_residuals.bench.world import oracle
from personalized_residuals.bench.world.concepts import load_concepts
from personalized_residuals.bench.world.model import WorldModel, to_latent
from personalized_residuals.bench.world.scenes import random_scene, render
from personalized_residuals.residual_core import TrainConfig


def test_the_oracle_reads_rendered_scenes_and_concepts_exactly():
    rng = random.Random(7)
    scenes = [random_scene(rng) for _ in range(200)]
    readings = oracle.read_images(render(scenes))
    right = [oracle.prompt_fidelity(r, s.background, [(o.shape, o.color) for o in s.objects])
             for r, s in zip(readings, scenes, strict=True)]
    assert all(right)
    concepts, _ = load_concepts()
    for concept in concepts.values():
        references = oracle.read_images(render(concept.references(6)))
        assert min(oracle.identity(r, concept)[0] for r in references) >= oracle.IDENTITY_HIT
        others = [oracle.identity(r, concept)[0] for r in readings]
        assert np.mean(others) < 0.2, "plain shapes are not the concept"


def test_a_residual_captures_the_concept_and_lag_keeps_the_rest():
    torch.manual_seed(0)
    model = WorldModel.load()
    concept = load_concepts()[0]["twotone_circle"]
    prompts = [p for p in concept_prompts(concept) if p.kind != "plain"]
    seeds = [0, 1, 2, 3]
    base = sample_prompts(None, model, prompts, seeds, base=True)
    trained = methods.residuals(model, to_latent(render(concept.references())), [f"a sks {concept.class_word}"],
                                TrainConfig(steps=150, batch_size=4, lr=1e-3, seed=0), 0.25)
    lagged = methods.with_lag(trained, "sks", concept.class_word, "max_fraction", 0.5)
    got = {name: score(concept, sample_prompts(t, model, prompts, seeds), base, None, None)
           for name, t in (("global", trained), ("LAG", lagged))}
    base_identity = score(concept, base, base, None, None)["identity"]
    print(f"\nbase identity {base_identity:.3f}; " + "; ".join(
        f"{k}: identity {v['identity']:.3f}, locality {v['locality']:.3f}" for k, v in got.items()))
    assert got["global"]["identity"] > base_identity + 0.25
    assert got["LAG"]["identity"] > base_identity + 0.15
    assert got["LAG"]["locality"] > got["global"]["locality"]
