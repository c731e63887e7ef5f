import pytest
import torch
from helpers import tiny_unet
from personalized_residuals.residual_core import ResidualError, ResidualMeta, ResidualSet, fileformat, find_targets
from safetensors import safe_open
from safetensors.torch import save_file


def _residual(use_linear):
    meta = ResidualMeta(class_word="guitar amplifier", identifier="sks", steps=150, lr=1e-3, seed=4, batch_size=4,
                        base_hash="0123456789abcdef")
    return ResidualSet.for_targets(find_targets(tiny_unet(use_linear)), 0.25, "random", seed=5, meta=meta)


@pytest.mark.parametrize("use_linear", [False, True])
def test_round_trip_is_bit_exact_with_kohya_keys_and_metadata(tmp_path, use_linear):
    residual = _residual(use_linear)
    path = str(tmp_path / "r.safetensors")
    fileformat.save(residual, path)
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        down = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight")
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_out.alpha")
    assert len(keys) == 3 * 11 and all(k.startswith("lora_unet_") and "_proj_out." in k for k in keys)
    assert down.ndim == (2 if use_linear else 4) and float(alpha) == down.shape[0]
    assert meta["format"] == "personalized_residual" and meta["format_version"] == "1"
    assert meta["class_word"] == "guitar amplifier" and meta["base_hash"] == "0123456789abcdef"
    loaded = fileformat.load(path)
    assert loaded.meta == residual.meta
    for key, layer in residual.layers.items():
        other = loaded.layers[key]
        assert torch.equal(other.up, layer.up) and torch.equal(other.down, layer.down)
        assert (other.conv, other.alpha) == (layer.conv, layer.alpha)
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"], "no temporary file is left"


def _write(tmp_path, sd, meta=None):
    path = str(tmp_path / "x.safetensors")
    save_file(sd, path, metadata=meta)
    return path


def test_damaged_or_foreign_files_say_what_is_wrong(tmp_path):
    good = fileformat.to_state_dict(_residual(False))
    key = "lora_unet_mid_block_attentions_0_proj_out"
    cases = [
        ({"lora_unet_down_blocks_0_attentions_0_attn1_to_q.lora_down.weight": torch.zeros(2, 4)}, None,
         "no proj_out residuals.*LoraLoaderModelOnly"),
        ({k: v for k, v in good.items() if k != f"{key}.lora_up.weight"}, None, "needs both lora_down"),
        ({**good, f"{key}.lora_up.weight": torch.zeros(3, 7)}, None, "not the two factors"),
        ({**good, f"{key}.lora_down.weight": torch.full_like(good[f"{key}.lora_down.weight"], float("nan"))}, None,
         "non-finite"),
        ({**good, "text_encoder.something": torch.zeros(1)}, None, "Unexpected tensors"),
        (good, {"format": "personalized_residual", "format_version": "2"}, "format version 2.*Update"),
        (good, {"format": "something_else"}, "not a personalized residual"),
        (good, {"steps": "many"}, "metadata field 'steps'"),
    ]
    for sd, meta, match in cases:
        with pytest.raises(ResidualError, match=match):
            fileformat.load(_write(tmp_path, sd, meta))


def test_truncated_files_and_other_formats_are_refused(tmp_path):
    path = tmp_path / "r.safetensors"
    fileformat.save(_residual(True), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResidualError, match="damaged or not safetensors"):
        fileformat.load(str(path))
    with pytest.raises(ResidualError, match="only safetensors"):
        fileformat.load(str(tmp_path / "r.ckpt"))


def test_a_plain_kohya_file_with_only_proj_out_keys_loads_without_metadata(tmp_path):
    sd = {k: v for k, v in fileformat.to_state_dict(_residual(False)).items() if not k.endswith(".alpha")}
    loaded = fileformat.load(_write(tmp_path, sd))
    assert loaded.meta.class_word == "" and all(layer.scale == 1.0 for layer in loaded.layers.values())
