"""LAG LoRA inside ComfyUI: LoRA files in kohya, ComfyUI and diffusers layouts on SD1.5 and SDXL, through the
node and the stock KSampler, against the stock LoRA loader."""

import contextlib
import zlib

import comfy.lora
import comfy.model_management
import comfy.sd
import comfy.utils
import pytest
import safetensors.torch
import torch
from comfy_env import concept_residual, ksample, run, weights_hash
from personalized_residuals.nodes.comfy_model import targets_of
from personalized_residuals.nodes.lag import PATCH_KEY, LagMaskPreview, LagSampler
from personalized_residuals.nodes.lora import LagLora
from personalized_residuals.residual_core import ResidualError, fileformat, lag, layer_block

import nodes as comfy_nodes

PROMPT = "a photo of a sks dog on the beach"
UNET = "diffusion_model."
# The layers that run before a block's first cross-attention: no mask of this call exists for them yet.
BEFORE = ("proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
          "transformer_blocks.0.attn1.to_v", "transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.attn2.to_q")


def _names(model, clip=None):
    """Model key -> every name a LoRA file may give it (ComfyUI's own key maps)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    names = {}
    for name, key in key_map.items():
        names.setdefault(key, []).append(name)
    return names


def _file_name(key, names, layout):
    path = key[len(UNET):-len(".weight")] if key.startswith(UNET) else None
    if layout == "comfyui":
        return key[:-len(".weight")]
    if layout == "diffusers":
        return next(n for n in names if n.startswith("unet."))
    if path is None:  # the text encoder's, kohya-named
        return next(n for n in names if n.startswith("lora_te_"))
    ldm = "lora_unet_" + path.replace(".", "_")
    return next((n for n in names if n.startswith("lora_unet_") and n != ldm), ldm)  # diffusers block names where they exist


def write_lora(path, model, select, layout="kohya", clip=None, text_encoder=False, scale=0.3):
    """A random rank-2 LoRA on every UNet layer whose path `select`s (and the text encoder's q/v projections), in
    `layout`. Each layer's factors depend only on its name, so two files share the layers they both have."""
    sd, names = {}, _names(model, clip if text_encoder else None)
    weights = {**model.model.state_dict(), **(clip.cond_stage_model.state_dict() if text_encoder else {})}
    for key, w in weights.items():
        in_unet = key.startswith(UNET) and w.ndim in (2, 4) and select(key[len(UNET):-len(".weight")])
        if not (key.endswith(".weight") and key in names and (in_unet or key.endswith(("q_proj.weight", "v_proj.weight")))):
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        up = torch.randn(w.shape[0], 2, generator=g) * scale
        down = torch.randn(2, *w.shape[1:], generator=g) * scale  # a 3x3 conv gets a LoCon (3x3 down, 1x1 up)
        if w.ndim == 4:
            up = up[:, :, None, None]
            if layout == "comfyui" and w.shape[2:] == (1, 1):
                up, down = up.flatten(1), down.flatten(1)  # ComfyUI's trainer saves 1x1 convs as 2-D factors
        name = _file_name(key, names[key], layout)
        if layout == "diffusers":  # no alpha: the scale is 1, so the up factor carries alpha / rank = 0.5
            sd[f"{name}_lora.up.weight"], sd[f"{name}_lora.down.weight"] = up * 0.5, down
        else:
            sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
            sd[f"{name}.alpha"] = torch.tensor(1.0)
    assert sd
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def stock(model, path):
    """The file through ComfyUI's stock LoRA loading (LoraLoaderModelOnly)."""
    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0)[0]


def lag_lora(model, clip, name, unmaskable="apply globally", **kw):
    args = {"trigger_word": "sks", "class_word": "dog", "prompt": PROMPT, "strength": 1.0, "unmaskable_layers": unmaskable,
            "mask_rule": "max_fraction", "mask_value": 0.5, "start_percent": 0.0, "end_percent": 1.0, **kw}
    return run(LagLora, model=model, clip=clip, lora_name=name, **args)


def base_hash(model):
    """weights_hash of the base model once ComfyUI has unloaded every clone (while one is loaded, its weight
    patches are merged into the shared weights, as with the stock LoRA loader)."""
    comfy.model_management.unload_all_models()
    return weights_hash(model)


def _not_before(path):
    return not path.endswith(BEFORE)


@pytest.fixture
def negative(clip):
    return comfy_nodes.CLIPTextEncode().encode(clip, "")[0]


def _mask_everywhere(monkeypatch, value):
    monkeypatch.setattr(lag, "threshold", lambda attn, rule, v: torch.full_like(attn, value))


def test_mask_of_ones_is_the_stock_loader_and_zeros_only_the_unmaskable_layers(sd15, clip, negative, loras_dir, monkeypatch):
    targets, before = targets_of(sd15), base_hash(sd15)
    unmaskable = lambda p: layer_block(p, targets) is None
    write_lora(loras_dir / "after.safetensors", sd15, _not_before)
    write_lora(loras_dir / "all.safetensors", sd15, lambda p: True)
    write_lora(loras_dir / "unmaskable.safetensors", sd15, unmaskable)
    m, positive, _ = lag_lora(sd15, clip, "after.safetensors")
    masked = m.get_attachment(PATCH_KEY).concepts[0].residual.layers
    assert len(masked) == 16 * 4 and not any(map(unmaskable, masked)), "proj_out, attn2.to_out.0 and ff's two layers"
    plain = ksample(sd15, positive, negative)
    globally = ksample(stock(sd15, loras_dir / "after.safetensors"), positive, negative)
    assert (globally - plain).abs().max() > 1e-2, "the LoRA must matter for this test to mean anything"
    _mask_everywhere(monkeypatch, 1.0)
    ones = ksample(m, positive, negative)
    # Merged weights compute (W + dW) x, the hooks W x + dW x: equal up to float32 rounding of values this large.
    assert float((ones - globally).abs().max()) <= 1e-5 * float(globally.abs().max())
    _mask_everywhere(monkeypatch, 0.0)
    everything = lag_lora(sd15, clip, "all.safetensors")[0]
    assert torch.equal(ksample(everything, positive, negative),
                       ksample(stock(sd15, loras_dir / "unmaskable.safetensors"), positive, negative))
    skipped = lag_lora(sd15, clip, "all.safetensors", "skip")[0]
    assert torch.equal(ksample(skipped, positive, negative), plain)
    assert base_hash(sd15) == before


def test_kohya_comfyui_and_diffusers_layouts_give_the_same_image(sd15, clip, negative, loras_dir):
    in_attention = lambda p: ".transformer_blocks." in p and ".attn" in p  # what diffusers attention-processor files hold
    outs, layers = [], []
    for layout in ("kohya", "comfyui", "diffusers"):
        write_lora(loras_dir / f"{layout}.safetensors", sd15, in_attention, layout)
        m, positive, _ = lag_lora(sd15, clip, f"{layout}.safetensors")
        outs.append(ksample(m, positive, negative))
        layers.append(sorted(m.get_attachment(PATCH_KEY).concepts[0].residual.layers))
    assert layers[0] == layers[1] == layers[2] and len(layers[0]) == 16 * 6
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], ksample(sd15, positive, negative))


def test_sdxl_masks_every_depth_of_its_blocks_and_ones_match_the_stock_loader(sdxl, clip_sdxl, loras_dir, monkeypatch):
    before = base_hash(sdxl)
    write_lora(loras_dir / "xl.safetensors", sdxl, _not_before)
    m, positive, _ = lag_lora(sdxl, clip_sdxl, "xl.safetensors")
    negative = clip_sdxl.encode_from_tokens_scheduled(clip_sdxl.tokenize(""))
    lagged = ksample(m, positive, negative)
    masks = m.get_attachment(PATCH_KEY).sessions[0].mean_masks()
    assert len(masks) == 11 and torch.isfinite(lagged).all()
    globally = ksample(stock(sdxl, loras_dir / "xl.safetensors"), positive, negative)
    plain = ksample(sdxl, positive, negative)
    assert not torch.equal(lagged, plain) and (globally - plain).abs().max() > 1e-2
    # transformer_blocks[1..9] run after block 0's attn2: with masks of ones they apply everywhere, as merged.
    _mask_everywhere(monkeypatch, 1.0)
    ones = ksample(m, positive, negative)
    assert float((ones - globally).abs().max()) <= 1e-5 * float(globally.abs().max())
    assert base_hash(sdxl) == before


def test_a_residual_file_through_lag_lora_is_the_lag_sampler(sd15, clip, negative, loras_dir):
    residual = concept_residual(sd15)
    fileformat.save(residual, str(loras_dir / "residual.safetensors"))
    by_sampler, positive = run(LagSampler, sd15, residual, clip, PROMPT, 1.0, "LAG", "max_fraction", 0.5, 0.0, 1.0)
    by_lora = lag_lora(sd15, clip, "residual.safetensors")[0]
    assert torch.equal(ksample(by_lora, positive, negative), ksample(by_sampler, positive, negative))


def test_a_residual_and_a_lora_share_one_image(sd15, clip, negative, loras_dir, monkeypatch):
    before = base_hash(sd15)
    both = "a photo of a sks dog and a zwx cat in a garden"
    cat = concept_residual(sd15, seed=2)
    cat.meta.identifier, cat.meta.class_word = "zwx", "cat"
    m = run(LagSampler, sd15, cat, clip, both, 1.0, "LAG", "soft", 1.0, 0.0, 1.0)[0]
    write_lora(loras_dir / "dog.safetensors", sd15, lambda p: True)
    m, positive, _ = lag_lora(m, clip, "dog.safetensors", prompt=both, mask_rule="soft", mask_value=1.0)
    patch = m.get_attachment(PATCH_KEY)
    assert [c.name for c in patch.concepts] == ["zwx cat", "sks dog"]
    applied, record = [], lag.LagSession.applied

    def spy(self, block, grid, mask, score):
        applied.append(mask.clone())
        return record(self, block, grid, mask, score)

    monkeypatch.setattr(lag.LagSession, "applied", spy)
    out = ksample(m, positive, negative)
    pairs = list(zip(applied[::2], applied[1::2], strict=True))
    assert len(pairs) == 3 * 16 and any(float(a.sum()) > 0 and float(b.sum()) > 0 for a, b in pairs)
    assert all(float((a * b).max()) == 0 for a, b in pairs), "where both attend, one wins: masks never overlap"
    preview = run(LagMaskPreview, m, {"samples": out})[0]
    assert float(preview[..., 0].max()) > 0 and float(preview[..., 2].max()) > 0, "red and blue: both concepts"
    assert base_hash(sd15) == before


def test_text_encoder_layers_follow_the_switch(sd15, clip, loras_dir):
    write_lora(loras_dir / "te.safetensors", sd15, lambda p: p.endswith("attn1.to_q"), clip=clip, text_encoder=True)
    plain = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))[0][0]
    _, positive, lora_clip = lag_lora(sd15, clip, "te.safetensors")
    assert not torch.equal(positive[0][0], plain) and lora_clip is not clip
    assert torch.equal(clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))[0][0], plain), "input CLIP unchanged"
    _, positive, same_clip = lag_lora(sd15, clip, "te.safetensors", "skip")
    assert torch.equal(positive[0][0], plain) and same_clip is clip


def test_no_step_inside_the_window_is_the_base_model(sd15, clip, negative, loras_dir):
    write_lora(loras_dir / "l.safetensors", sd15, lambda p: True)
    m, positive, _ = lag_lora(sd15, clip, "l.safetensors", "skip", start_percent=0.9, end_percent=0.95)
    assert torch.equal(ksample(m, positive, negative), ksample(sd15, positive, negative))


def test_errors_name_the_input_and_the_fix(sd15, sdxl, clip, loras_dir):
    write_lora(loras_dir / "resblocks.safetensors", sd15, lambda p: ".emb_layers." in p or p.startswith("time_embed"))
    with pytest.raises(ResidualError, match=r"no layer inside the transformer blocks .*stock LoraLoader"):
        lag_lora(sd15, clip, "resblocks.safetensors")
    write_lora(loras_dir / "te_only.safetensors", sd15, lambda p: False, clip=clip, text_encoder=True)
    with pytest.raises(ResidualError, match="only the text encoder.*stock LoraLoader"):
        lag_lora(sd15, clip, "te_only.safetensors")
    write_lora(loras_dir / "xl.safetensors", sdxl, lambda p: p.endswith("attn2.to_k"))
    with pytest.raises(ResidualError, match=r"made for another model: its layer .*attn2.to_k is \d+x64, the model's "
                                            r"\(.*\) is \d+x32. Pick a LoRA made for"):
        lag_lora(sd15, clip, "xl.safetensors")
    safetensors.torch.save_file({"lora_unet_nonsense.lora_up.weight": torch.zeros(4, 2)}, str(loras_dir / "x.safetensors"))
    with pytest.raises(ResidualError, match="no layers for this model .*made for another model; pick a LoRA made for"):
        lag_lora(sd15, clip, "x.safetensors")
    write_lora(loras_dir / "ok.safetensors", sd15, lambda p: True)
    with pytest.raises(ResidualError, match="The identifier 'zwx' is not in the prompt"):
        lag_lora(sd15, clip, "ok.safetensors", trigger_word="zwx")
    with pytest.raises(ResidualError, match="trigger_word is empty"):
        lag_lora(sd15, clip, "ok.safetensors", trigger_word=" ")
    with pytest.raises(ResidualError, match="unmaskable_layers must be one of"):
        lag_lora(sd15, clip, "ok.safetensors", "mask them")
    with pytest.raises(ResidualError, match=r"strength must be in \[-4, 4\], got nan"):
        lag_lora(sd15, clip, "ok.safetensors", strength=float("nan"))
    (loras_dir / "old.ckpt").write_bytes(b"not read")
    with pytest.raises(ResidualError, match="only .safetensors LoRAs are read"):
        lag_lora(sd15, clip, "old.ckpt")
    (loras_dir / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ResidualError, match="Can't read 'broken.safetensors'.*damaged"):
        lag_lora(sd15, clip, "broken.safetensors")
    with pytest.raises(ResidualError, match="No LoRA 'gone.safetensors'"):
        lag_lora(sd15, clip, "gone.safetensors")


def test_token_merging_leaves_out_the_layers_whose_tokens_it_merged(sd15, clip, negative, loras_dir):
    """The stock ToMe node merges the self-attention queries of the full-resolution blocks: their attn1.to_q and
    to_out.0 see fewer tokens than the block has positions, so the LoRA is left out there, and only there."""
    from comfy_extras.nodes_tomesd import TomePatchModel

    tome = run(TomePatchModel, sd15, 0.5)[0]
    full_resolution = ("input_blocks.1.", "input_blocks.2.", "output_blocks.9.", "output_blocks.10.", "output_blocks.11.")
    merged = lambda p: p.startswith(full_resolution) and p.endswith(("attn1.to_q", "attn1.to_out.0"))
    write_lora(loras_dir / "attn1.safetensors", sd15, lambda p: ".attn1." in p)
    write_lora(loras_dir / "unmerged.safetensors", sd15, lambda p: ".attn1." in p and not merged(p))
    every, positive, _ = lag_lora(tome, clip, "attn1.safetensors")
    unmerged = lag_lora(tome, clip, "unmerged.safetensors")[0]
    outs = []
    for m in (every, unmerged, tome):
        torch.manual_seed(0)  # ToMe picks its merges with the global generator
        with pytest.warns(UserWarning, match="left out") if m is every else contextlib.nullcontext():
            outs.append(ksample(m, positive, negative))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
