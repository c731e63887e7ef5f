"""Bad inputs through the nodes as ComfyUI runs them: each gets an error naming the input and the fix, raised
before the VAE, the text encoder or the UNet runs; legal but weak inputs get a warning the user sees."""

import logging

import pytest
import torch
from comfy_env import concept_residual, run, train
from personalized_residuals.nodes import train as train_node
from personalized_residuals.nodes.files import LoadResidual, SaveResidual
from personalized_residuals.nodes.lag import LagSampler
from personalized_residuals.residual_core import ResidualError, fileformat
from safetensors.torch import save_file

PHOTOS = [torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))]


class _NoEncoding:
    """The CLIP with its tokenizer but no encoder, or a VAE with no encoder: heavy work must not start."""

    def __init__(self, clip=None):
        self.clip = clip

    def tokenize(self, text, **kwargs):
        return self.clip.tokenize(text, **kwargs)

    def encode_from_tokens_scheduled(self, *args, **kwargs):
        raise AssertionError("the text encoder ran before the inputs were checked")

    def encode(self, *args, **kwargs):
        raise AssertionError("the VAE ran before the inputs were checked")


def _train(model, clip, vae, images=PHOTOS, **overrides):
    return train(model, clip, vae, images, **{"steps": 2, **overrides})


NAN = float("nan")
TRAIN_CASES = [
    ({"images": []}, "images: no photos. Connect an IMAGE with photos"),  # the fix in the UI's words
    ({"images": [torch.zeros(0, 64, 64, 3)]}, "images: no photos"),
    ({"images": [torch.rand(1, 64, 64, 5)]}, "photo 1 of 1 has 5 channels"),
    ({"images": [*PHOTOS, torch.rand(1, 32, 48, 3)]}, "photo 4 of 4 is 48x32 px.*Use a larger photo"),
    ({"images": [torch.rand(1, 64, 4200, 3)]}, "4200x64 px.*Scale it down"),
    ({"images": [(torch.rand(1, 64, 64, 3) * 255).to(torch.uint8)]}, "uint8 integers.*Divide 8-bit data by 255"),
    ({"images": [torch.rand(1, 64, 64, 3) * 65535]}, "values from .*16-bit data: divide by 65535"),
    ({"images": [torch.full((1, 64, 64, 3), NAN)]}, "contains NaN or infinite values"),
    ({"class_word": "  "}, "class_word and identifier must not be empty"),
    ({"identifier": ""}, "class_word and identifier must not be empty"),
    ({"identifier": "()"}, "identifier .\\(\\). has no tokens"),
    ({"steps": 0}, r"steps must be in \[1, 100000\], got 0"),
    ({"batch_size": 0}, r"batch_size must be in \[1, 64\], got 0"),
    ({"learning_rate": NAN}, r"learning rate must be in \(0, 1\], got nan"),
    ({"learning_rate": float("inf")}, r"learning rate must be in \(0, 1\], got inf"),
    ({"rank_fraction": 0.0}, r"rank_fraction must be in \(0, 1\], got 0.0"),
    ({"rank_fraction": NAN}, r"rank_fraction must be in \(0, 1\], got nan"),
    ({"resolution": 100}, "resolution must be a multiple of 8"),
    ({"resolution": 32}, r"resolution must be in \[64, 4096\], got 32"),
    ({"init": "gaussian"}, "init must be one of"),
    # subject masks (one per photo, [B, H, W] in 0-1) and captions (one per photo, with the concept's words)
    ({"masks": torch.ones(2, 64, 64)}, r"masks: 2 mask\(s\) for 3 photo\(s\); give one mask per photo"),
    ({"masks": torch.ones(3, 64, 48)}, "masks: mask 1 is 48x64 px but photo 1 is 64x64 px"),
    ({"masks": torch.ones(3, 64, 64, 1)}, r"a MASK is \[batch, height, width\] in 0-1.*Convert Image to Mask"),
    ({"masks": torch.full((3, 64, 64), 255.0)}, "mask 1 of 3 has values from 255 to 255; a MASK holds 0-1"),
    ({"masks": torch.ones(3, 64, 64).index_fill(0, torch.tensor([1]), 0)}, "the mask of photo 2 is all 0"),
    ({"masks": torch.ones(3, 64, 64), "mask_marks": "background"}, "all 1: with mask_marks 'background'"),
    ({"mask_marks": "alpha"}, "mask_marks must be one of"),
    ({"captions": "a sks dog\na sks dog"}, r"captions: 2 lines for 3 photo\(s\); give one caption per photo"),
    ({"captions": "a sks dog\na dog\na sks dog"}, r"captions, line 2 \(photo 2\): The identifier 'sks' is not in"),
]


@pytest.mark.parametrize("overrides,match", TRAIN_CASES, ids=[m.split(" ")[0] + str(i) for i, (_, m) in
                                                               enumerate(TRAIN_CASES)])
def test_train_refuses_bad_inputs_before_any_heavy_work(sd15, clip, overrides, match, monkeypatch):
    monkeypatch.setattr(train_node._TrainingRun, "sample", lambda *a, **k: pytest.fail("the UNet ran"))
    with pytest.raises(ResidualError, match=match):
        _train(sd15, _NoEncoding(clip), _NoEncoding(), **overrides)


def test_missing_model_inputs_are_named(sd15, clip, vae):
    with pytest.raises(ResidualError, match="clip is empty: connect the CLIP output of Load Checkpoint"):
        _train(sd15, None, vae)
    with pytest.raises(ResidualError, match="vae is empty"):
        _train(sd15, clip, None)


def test_nan_from_the_vae_is_caught_before_training(sd15, clip, vae, monkeypatch):
    monkeypatch.setattr(train_node._TrainingRun, "sample", lambda *a, **k: pytest.fail("the UNet ran"))

    class NanVae:
        def encode(self, pixels):
            return vae.encode(pixels) * NAN

    with pytest.raises(ResidualError, match="VAE or the text encoder returned NaN.*--fp32-vae"):
        _train(sd15, clip, NanVae())


def test_weak_inputs_train_with_a_warning_in_the_log_and_on_the_loss_curve(sd15, clip, vae, caplog):
    with caplog.at_level(logging.WARNING):
        _, plain, _ = _train(sd15, clip, vae)
    assert not caplog.records and plain.shape == (1, 360, 640, 3)
    with caplog.at_level(logging.WARNING):
        _, warned, _ = _train(sd15, clip, vae, images=[PHOTOS[0][:1]], identifier="photo")
    messages = [r.getMessage() for r in caplog.records]
    assert any("Only 1 photo" in m for m in messages)
    assert any("'photo' is a common word" in m and "Pick a rare token" in m for m in messages)
    assert warned.shape[1] > 360, "the loss curve grows a warning band"
    band = warned[0, 20:warned.shape[1] - 330]
    red = (band[..., 0] > 0.6) & (band[..., 1] < 0.3) & (band[..., 2] < 0.3)
    assert red.sum() > 100, "the warnings are printed in red above the plot"


def _lag(model, residual, clip, **kw):
    args = {"prompt": "a sks dog", "strength": 1.0, "mode": "LAG", "mask_rule": "max_fraction", "mask_value": 0.5,
            "start_percent": 0.0, "end_percent": 1.0, **kw}
    return run(LagSampler, model, residual, clip, **args)


@pytest.mark.parametrize("overrides,match", [
    ({"strength": NAN}, r"strength must be in \[-4, 4\], got nan"),
    ({"start_percent": NAN}, r"start_percent must be in \[0, 1\], got nan"),
    ({"end_percent": float("inf")}, r"end_percent must be in \[0, 1\], got inf"),
    ({"start_percent": 0.8, "end_percent": 0.2}, "must not exceed end_percent"),
    ({"mask_value": NAN}, "mask value for max_fraction"),
    ({"mask_rule": "soft", "mask_value": float("inf")}, "mask value for soft"),
    ({"prompt": "a photo of a sks cat"}, "class word 'dog' is not in the prompt"),
    ({"prompt": "a photo of a dog"}, "identifier 'sks' is not in the prompt"),
])
def test_lag_sampler_refuses_bad_settings(sd15, clip, overrides, match):
    with pytest.raises(ResidualError, match=match):
        _lag(sd15, concept_residual(sd15), clip, **overrides)


def test_residual_files_that_are_not_ours_or_are_damaged(sd15, clip, loras_dir, caplog):
    folder = loras_dir / "personalized_residuals"
    folder.mkdir()
    residual = concept_residual(sd15)
    good = fileformat.to_state_dict(residual)
    save_file(good, str(folder / "newer.safetensors"), metadata={**fileformat.metadata(residual), "format_version": "7"})
    save_file({"lora_unet_mid_block_attentions_0_attn2_to_k.lora_up.weight": torch.zeros(2, 2)},
              str(folder / "lora.safetensors"))
    save_file(good, str(folder / "plain.safetensors"))  # kohya tensors, no metadata
    fileformat.save(residual, str(folder / "cut.safetensors"))
    (folder / "cut.safetensors").write_bytes((folder / "cut.safetensors").read_bytes()[:1000])
    for name, match in [("newer.safetensors", "format version '7'.*Update the node pack"),
                        ("lora.safetensors", "no proj_out residuals.*LoraLoaderModelOnly"),
                        ("cut.safetensors", "Can't read 'cut.safetensors'.*damaged"),
                        ("../../escape.safetensors", "no absolute paths, no '..'"),
                        ("/etc/passwd.safetensors", "no absolute paths"),
                        ("notes.txt", "must be a .safetensors file")]:
        with pytest.raises(ResidualError, match=match):
            run(LoadResidual, name)
    with caplog.at_level(logging.WARNING):
        plain, class_word, identifier = run(LoadResidual, "plain.safetensors")
    assert (class_word, identifier) == ("", "") and "global mode works without" in caplog.text
    with pytest.raises(ResidualError, match="no class word or identifier in its metadata.*Use mode 'global'"):
        _lag(sd15, plain, clip)
    assert _lag(sd15, plain, clip, mode="global")[0] is not None


def test_save_names_stay_in_the_folder_and_nothing_is_overwritten(sd15, loras_dir, monkeypatch):
    from personalized_residuals.nodes import files

    residual = concept_residual(sd15)
    for prefix in ("../../x", "/tmp/x", "a/b", "..", ".hidden", "C:\\x"):
        with pytest.raises(ResidualError, match="must be a plain name"):
            run(SaveResidual, residual, prefix)
    assert run(SaveResidual, residual, "Hund: mein <Bester>")[0] == "personalized_residuals/Hund_ mein _Bester__00001.safetensors"
    assert run(SaveResidual, residual, "小狗")[0] == "personalized_residuals/小狗_00001.safetensors"
    folder = loras_dir / "personalized_residuals"
    (folder / "SKS_DOG_00001.safetensors").write_bytes(b"someone else's file")
    assert run(SaveResidual, residual, "sks_dog")[0].endswith("sks_dog_00002.safetensors"), "case-insensitive"
    (folder / "zwx_cat_00001.safetensors").write_bytes(b"saved by another ComfyUI meanwhile")
    monkeypatch.setattr(files.os, "listdir", lambda folder: [])  # ... after we looked at the folder
    assert run(SaveResidual, residual, "zwx_cat")[0].endswith("zwx_cat_00002.safetensors")
    assert (folder / "SKS_DOG_00001.safetensors").read_bytes() == b"someone else's file"
    assert (folder / "zwx_cat_00001.safetensors").read_bytes() == b"saved by another ComfyUI meanwhile"
