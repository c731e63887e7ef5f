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
    down, up = good[f"{key}.lora_down.weight"], good[f"{key}.lora_up.weight"]
    fmt = {"format": "personalized_residual", "format_version": "1"}
    cases = [
        ({"lora_unet_down_blocks_0_attentions_0_attn1_to_q.lora_down.weight": torch.zeros(2, 4)}, None,
         "no proj_out residuals.*not a personalized residual"),
        ({k: v for k, v in good.items() if k != f"{key}.lora_up.weight"}, None, "needs both lora_down"),
        ({**good, f"{key}.lora_up.weight": torch.zeros(3, 7)}, None, "not the two factors"),
        ({**good, f"{key}.lora_down.weight": down[:0], f"{key}.lora_up.weight": up[:, :0]}, None, "not the two factors"),
        ({**good, f"{key}.lora_down.weight": torch.full_like(down, float("nan"))}, None, "non-finite"),
        ({**good, f"{key}.lora_up.weight": up.to(torch.int32)}, None, "non-float"),
        ({**good, f"{key}.alpha": torch.ones(2)}, None, "alpha has shape"),
        ({**good, f"{key}.lora_down.weight": down[:, :, 0, 0], f"{key}.lora_up.weight": up[:, :, 0, 0]}, None,
         "mixes conv"),
        ({**good, "text_encoder.something": torch.zeros(1)}, None, "besides proj_out.*regular LoRA"),
        ({**good, f"{key[:-8]}attn2_to_k.lora_up.weight": torch.zeros(1)}, None, "besides proj_out"),
        (good, {**fmt, "format_version": "2"}, "format version '2'.*reads up to 1"),
        (good, {**fmt, "format_version": "1.1"}, "format version '1.1'"),
        (good, {"format": "something_else"}, "not a personalized residual"),
        (good, {**fmt, "steps": "many"}, "metadata field 'steps'"),
        (good, {**fmt, "rank_fraction": "nan"}, "metadata is wrong: rank_fraction"),
        (good, {**fmt, "lr": "inf"}, "metadata is wrong: lr"),
        (good, {**fmt, "batch_size": "-4"}, "metadata is wrong: batch_size"),
        (good, {**fmt, "init": "gaussian"}, "metadata is wrong: init"),
        (good, {**fmt, "base_family": "sdxl"}, "metadata says it is for sdxl but its tensors are shaped for custom"),
    ]
    for sd, meta, match in cases:
        with pytest.raises(ResidualError, match=match):
            fileformat.load(_write(tmp_path, sd, meta))
        with pytest.raises(ResidualError, match=match):
            fileformat.from_state_dict(sd, meta)


def test_truncated_files_and_other_formats_are_refused(tmp_path):
    path = tmp_path / "r.safetensors"
    fileformat.save(_residual(True), str(path))
    data = path.read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ResidualError, match="damaged or not safetensors"):
            fileformat.load(str(path))
    with pytest.raises(ResidualError, match="only safetensors"):
        fileformat.load(str(tmp_path / "r.ckpt"))
    with pytest.raises(ResidualError, match="damaged or not safetensors"):
        fileformat.load(str(tmp_path / "missing.safetensors"))


class _Payload:
    """Unpickling this creates a file: the test sees whether anything was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_renamed_to_safetensors_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    torch.save({"lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": _Payload(str(marker))}, str(path))
    with pytest.raises(ResidualError, match="damaged or not safetensors"):
        fileformat.load(str(path))
    assert not marker.exists()


def test_names_and_metadata_are_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    checkpoint = {"model.diffusion_model.input_blocks.1.1.proj_out.weight": torch.zeros(8, 8, 1, 1)}
    read = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def metadata(self):
            return self.f.metadata()

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(fileformat, "safe_open", Spy)
    for sd, meta in ((checkpoint, None), (fileformat.to_state_dict(_residual(False)), {"format_version": "9"})):
        with pytest.raises(ResidualError):
            fileformat.load(_write(tmp_path, sd, meta))
    assert read == []
    fileformat.load(_write(tmp_path, fileformat.to_state_dict(_residual(False))))
    assert len(read) == 3 * 11, "the spy does see reads"


def test_saving_never_overwrites_and_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    first, second = _residual(False), _residual(True)
    path = tmp_path / "r.safetensors"
    fileformat.save(first, str(path))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="'r.safetensors' exists; it was not overwritten"):
        fileformat.save(second, str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]
    fileformat.save(second, str(path), overwrite=True)
    assert path.read_bytes() != before

    def interrupted(fd):  # the data is written, the process is told to stop before the file is complete
        raise KeyboardInterrupt

    monkeypatch.setattr(fileformat.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fileformat.save(first, str(tmp_path / "new.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"], "no partial or temporary file"


def test_without_hard_links_a_save_still_refuses_to_overwrite(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr(fileformat.os, "link", no_links)
    path = tmp_path / "r.safetensors"
    fileformat.save(_residual(False), str(path))
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        fileformat.save(_residual(True), str(path))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]


def test_a_plain_kohya_file_with_only_proj_out_keys_loads_without_metadata(tmp_path):
    sd = {k: v for k, v in fileformat.to_state_dict(_residual(False)).items() if not k.endswith(".alpha")}
    loaded = fileformat.load(_write(tmp_path, sd))
    assert loaded.meta.class_word == "" and all(layer.scale == 1.0 for layer in loaded.layers.values())
    assert loaded.meta.base_family.startswith("custom-11x"), "the family is read from the tensors"


def test_flux_residual_names_are_kohyas_flux_names_and_round_trip(tmp_path):
    from personalized_residuals.residual_core import Target, model_family

    def flux_targets(doubles, singles, dim):
        return ([Target(f"double_blocks.{i}.img_attn.proj", ("double", i), False, dim, dim, 1) for i in range(doubles)]
                + [Target(f"single_blocks.{i}.linear2", ("single", i), False, dim, 5 * dim, 1) for i in range(singles)])

    targets = flux_targets(2, 3, 16)
    r = ResidualSet.for_targets(targets, 0.25, init="random", seed=1)
    assert fileformat.kohya_key("double_blocks.1.img_attn.proj") == "lora_unet_double_blocks_1_img_attn_proj"
    assert fileformat.kohya_key("single_blocks.12.linear2") == "lora_unet_single_blocks_12_linear2"
    path = str(tmp_path / "flux.safetensors")
    fileformat.save(r, path)
    back = fileformat.load(path)
    assert back.meta.base_family == model_family(targets) == "custom-flux-2+3x16"
    assert all(torch.equal(back.layers[k].weight_delta(), layer.weight_delta()) for k, layer in r.layers.items())
    assert model_family(flux_targets(19, 38, 3072)) == "flux"
    sd = fileformat.to_state_dict(r)
    mixed = {**sd, **fileformat.to_state_dict(ResidualSet.for_targets(
        [Target("middle_block.1.proj_out", ("middle", 0), False, 16, 16, 1)], 0.25))}
    with pytest.raises(ResidualError, match="mixes SD UNet and Flux layers"):
        fileformat.from_state_dict(mixed)
