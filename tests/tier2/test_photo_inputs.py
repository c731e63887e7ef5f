"""Per-photo inputs of Train Personalized Residual inside ComfyUI: subject masks (the loss counts only the
subject) and captions (photo i trains with caption i), as a batch or as the lists a dataset loader gives."""

import logging

import comfy.samplers
import pytest
import torch
from comfy_env import run, train
from personalized_residuals.nodes import train as train_node
from personalized_residuals.nodes.train import TrainPersonalizedResidual
from personalized_residuals.residual_core import ResidualError
from personalized_residuals.residual_core.train import _draw

IMAGES = [torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))]
CAPTIONS = ["a photo of a sks dog on grass", "a sks dog on a red sofa", "a photo of a sks dog on grass"]


def _subject(n=3, size=64):
    masks = torch.zeros(n, size, size)
    masks[:, 16:48, 20:44] = 1
    return masks


def _flat(residual):
    return torch.cat([p.flatten() for p in residual.parameters()])


def test_masks_and_captions_train_and_change_what_is_learned(sd15, clip, vae, caplog):
    plain = _flat(train(sd15, clip, vae, IMAGES, flip=True)[0])
    with caplog.at_level(logging.INFO):
        residual, curve, _ = train(sd15, clip, vae, IMAGES, flip=True, masks=_subject(), captions="\n".join(CAPTIONS))
    both = _flat(residual)
    assert torch.isfinite(both).all() and both.abs().sum() > 0 and curve.shape == (1, 360, 640, 3)
    assert "on 3 photos with subject masks, 2 distinct caption(s)" in caplog.text
    masked = _flat(train(sd15, clip, vae, IMAGES, flip=True, masks=_subject())[0])
    captioned = _flat(train(sd15, clip, vae, IMAGES, flip=True, captions="\n".join(CAPTIONS))[0])
    for other in (masked, captioned, both):
        assert not torch.allclose(other, plain, atol=1e-7)
    assert not torch.allclose(masked, both, atol=1e-7) and not torch.allclose(captioned, both, atol=1e-7)


def test_neutral_masks_and_captions_change_nothing(sd15, clip, vae):
    """Captions that all read the training prompt: the same residual, bit for bit. Masks of ones, or masks
    marking no background: the unmasked loss (up to rounding)."""
    plain = _flat(train(sd15, clip, vae, IMAGES, seed=5)[0])
    same = _flat(train(sd15, clip, vae, IMAGES, seed=5, captions="a photo of a sks dog\n" * 3)[0])
    assert torch.equal(plain, same)
    ones = _flat(train(sd15, clip, vae, IMAGES, seed=5, masks=torch.ones(3, 64, 64))[0])
    no_background = _flat(train(sd15, clip, vae, IMAGES, seed=5, masks=torch.zeros(3, 64, 64),
                                mask_marks="background")[0])
    assert torch.allclose(plain, ones, atol=1e-6) and torch.equal(ones, no_background)


def test_each_photo_trains_with_its_caption(sd15, clip, vae, monkeypatch):
    """Every UNet call of training gets the caption of the photos in it: one call per caption in the batch."""
    texts = list(dict.fromkeys(CAPTIONS))
    encoded = [clip.encode_from_tokens_scheduled(clip.tokenize(t))[0][0] for t in texts]
    calls = []
    calc = comfy.samplers.calc_cond_batch

    def recording(model, conds, x, timestep, model_options):
        [cond] = conds
        context = cond[0]["model_conds"]["c_crossattn"].cond
        calls.append(([k for k, e in enumerate(encoded) if torch.equal(e, context.to(e))], len(x)))
        return calc(model, conds, x, timestep, model_options)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", recording)
    steps, batch = 6, 3
    train(sd15, clip, vae, IMAGES, steps=steps, batch_size=batch, flip=True, seed=1, captions="\n".join(CAPTIONS))
    config = train_node.TrainConfig(steps=steps, batch_size=batch, seed=1, flip=True)
    draws = _draw(config, 3, 1000, (4, 8, 8))
    of_photo = [texts.index(c) for c in CAPTIONS]
    expected = []
    for step in range(steps):
        which = [of_photo[i] for i in draws.index[step].tolist()]
        expected += [([k], which.count(k)) for k in sorted(set(which))]
    assert calls == expected


def test_lists_as_a_dataset_loader_gives_them(sd15, clip, vae):
    """Photos of different sizes as a list, their masks as a list, a list of caption strings (the texts of
    Load Image and Text Dataset from Folder): taken photo by photo."""
    images = [torch.rand(1, 64, 64, 3), torch.rand(1, 96, 64, 3)]
    masks = [torch.ones(1, 64, 64), torch.ones(1, 96, 64)]
    masks[1][0, :20] = 0
    args = {"class_word": "dog", "identifier": "sks", "steps": 2, "learning_rate": 1e-3, "batch_size": 2,
            "rank_fraction": 0.25, "seed": 0, "resolution": 64, "flip": False, "init": "zero", "sample_steps": 0}
    lists = {k: [v] for k, v in args.items()}
    residual, _, _ = run(TrainPersonalizedResidual, model=[sd15], clip=[clip], vae=[vae], images=images, masks=masks,
                         captions=["a sks dog, front", "a sks dog, side"], **lists)
    assert torch.isfinite(_flat(residual)).all()
    with pytest.raises(ResidualError, match=r"captions: 3 captions for 2 photo\(s\)"):
        run(TrainPersonalizedResidual, model=[sd15], clip=[clip], vae=[vae], images=images,
            captions=["a sks dog", "a sks dog", "a sks dog"], **lists)
    with pytest.raises(ResidualError, match="captions: caption 2 is empty.*without a .txt file"):
        run(TrainPersonalizedResidual, model=[sd15], clip=[clip], vae=[vae], images=images,
            captions=["a sks dog", ""], **lists)
    with pytest.raises(ResidualError, match="mask 2 is 64x64 px but photo 2 is 64x96 px"):
        run(TrainPersonalizedResidual, model=[sd15], clip=[clip], vae=[vae], images=images,
            masks=[torch.ones(2, 64, 64)], **lists)


def test_a_cut_out_mask_with_the_wrong_mask_marks_gets_a_warning(sd15, clip, vae, caplog):
    cut_out = 1 - _subject()  # Load Image's MASK of a cut-out PNG: 1 on the transparent background
    with caplog.at_level(logging.WARNING):
        _, curve, _ = train(sd15, clip, vae, IMAGES, masks=cut_out)
    assert "covers the whole border" in caplog.text and "set mask_marks to 'background'" in caplog.text
    assert curve.shape[1] > 360, "the warning is on the loss curve too"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(sd15, clip, vae, IMAGES, masks=cut_out, mask_marks="background")
    assert "covers the whole border" not in caplog.text


# ---------------------------------------------------------------- the shipped workflow over HTTP


@pytest.mark.server
def test_train_with_masks_workflow_runs_over_http_and_bad_captions_are_named(client, comfy_server):
    from comfy_server import api_workflow

    graph = api_workflow("train_with_masks", PersonalizedResidualTrain={"seed": 2})
    result = client.run(graph)
    assert result.error is None, result.error
    assert result.history["status"]["status_str"] == "success"
    saved = next(o["residual_name"][0] for o in result.outputs.values() if "residual_name" in o)
    assert (comfy_server.loras / saved).is_file()
    assert "with subject masks" in comfy_server.log()

    bad = client.run(api_workflow("train_with_masks", PersonalizedResidualTrain={"captions": "a sks dog\na dog"}))
    assert bad.error and bad.error["node_type"] == "PersonalizedResidualTrain"
    assert "captions, line 2 (photo 2): The identifier 'sks' is not in the prompt" in bad.error["exception_message"]
