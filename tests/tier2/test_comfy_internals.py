"""Each ComfyUI internal the pack relies on (nodes/comfy_model.py), pinned by name: when a ComfyUI update
changes one, the test named for it fails."""

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch
from comfy.patcher_extension import WrappersMP
from comfy_env import concept_residual, ksample, run, stock_lora
from personalized_residuals.nodes import comfy_model
from personalized_residuals.nodes.lag import PATCH_KEY, LagSampler
from personalized_residuals.residual_core import fileformat

import nodes as comfy_nodes

PROMPT = "a photo of a sks dog on the beach"


def test_UNET_CALL_ARGS_is_the_order_diffusion_model_wrappers_get(sd15, clip):
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append({name: comfy_model.unet_call_arg(args, kwargs, name) for name in comfy_model.UNET_CALL_ARGS})
        return executor(*args, **kwargs)

    m = sd15.clone()
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "pin", wrapper)
    positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    ksample(m, positive, positive, steps=1, size=8)
    call = seen[0]
    assert call["x"].shape[1:] == (4, 8, 8) and call["timesteps"].shape == (call["x"].shape[0],)
    assert call["context"].shape[1:] == (77, 32)
    options = call["transformer_options"]
    assert isinstance(options, dict) and options["cond_or_uncond"] and len(options["uuids"]) == len(options["cond_or_uncond"])


def test_ModelPatcher_backup_holds_the_original_weight_while_a_lora_is_merged(sd15, tmp_path):
    from personalized_residuals.nodes.comfy_model import base_hash, targets_of

    targets = targets_of(sd15)
    before = base_hash(sd15, targets)
    lora = stock_lora(sd15, concept_residual(sd15, seed=5), tmp_path)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([lora], force_full_load=True)
    key = f"diffusion_model.{targets[0].name}.weight"
    assert key in lora.backup and not torch.equal(lora.backup[key].weight, lora.get_model_object(key)), "merged now"
    assert base_hash(lora, targets) == before
    lora.unpatch_model()


def test_LORA_WEIGHTS_names_the_lora_adapters_factors(sd15, tmp_path):
    residual = concept_residual(sd15, seed=6)
    path = tmp_path / "r.safetensors"
    fileformat.save(residual, str(path))
    key_map = comfy.lora.model_lora_keys_unet(sd15.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(path))), key_map)
    (key, patch), *_ = sorted(patches.items(), key=lambda kv: str(kv[0]))
    w = comfy_model.lora_weights(patch)
    assert w is not None and w.mid is None and w.dora_scale is None and w.reshape is None
    assert w.up.shape[1] == w.down.shape[0] and float(w.alpha) == w.down.shape[0], "rank, and alpha = rank as saved"
    assert w.down.shape[0] in {layer.rank for layer in residual.layers.values()}


def test_entry_tokens_reads_model_conds_not_the_copied_cross_attn(sd15, clip):
    """ComfyUI gives the negative a copy of each positive area entry with the negative's model_conds but the
    positive's cross_attn and uuid (create_cond_with_same_area_if_none)."""
    encode = lambda text: comfy_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    positive = comfy_nodes.ConditioningSetArea().append(encode(PROMPT), 32, 32, 0, 0, 1.0)[0]
    negative = encode("")
    x = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        conds = {k: comfy.sampler_helpers.convert_cond(v) for k, v in (("positive", positive), ("negative", negative))}
        conds = comfy.samplers.process_conds(sd15.model, x, conds, x.device)
    copy = next(e for e in conds["negative"] if "area" in e)
    assert copy[comfy_model.ENTRY_UUID] == conds["positive"][0][comfy_model.ENTRY_UUID]
    assert torch.equal(copy["cross_attn"], positive[0][0])
    assert torch.equal(comfy_model.entry_tokens(copy), negative[0][0])
    entries = comfy_model.cond_entries([conds["positive"], conds["negative"]], x, torch.tensor([1.0]))
    assert [e.frame for e in entries] == [(0, 0, 4, 4), None, (0, 0, 4, 4)] and all(e.active for e in entries)


def test_a_clone_shares_the_lag_patch_and_its_wrappers(sd15, clip):
    m, _ = run(LagSampler, sd15, concept_residual(sd15), clip, PROMPT, 1.0, "LAG", "max_fraction", 0.5, 0.0, 1.0)
    clone = m.clone()
    patch = m.get_attachment(PATCH_KEY)
    assert clone.get_attachment(PATCH_KEY) is patch
    for kind, method in ((WrappersMP.DIFFUSION_MODEL, patch.wrapper), (WrappersMP.CALC_COND_BATCH, patch.calc_cond_batch)):
        assert clone.get_wrappers(kind, PATCH_KEY) == [method]
    assert sd15.get_attachment(PATCH_KEY) is None, "the input MODEL is left as it was"


def test_schedule_position_reads_sample_sigmas_at_each_evaluation(sd15, clip):
    seen = []

    def wrapper(executor, model, conds, x_in, timestep, model_options):
        seen.append(comfy_model.schedule_position(model_options, timestep))
        return executor(model, conds, x_in, timestep, model_options)

    m = sd15.clone()
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, "pin", wrapper)
    positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    ksample(m, positive, positive, steps=4, size=8)
    # euler: one evaluation per step, at each step's sigma
    assert [(p.step, p.steps) for p in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert comfy_model.schedule_position({}, torch.tensor([1.0])) is None


def test_ATTENTION_OVERRIDE_runs_every_sd_attention_with_attn2_right_after_its_to_k(sd15, clip):
    """The attention bias relies on this: the override replaces each attention call of SD's transformer blocks,
    q and k as [B, tokens, heads*d], and attn2's call follows its to_k with nothing between."""
    events = []

    def override(func, *args, **kwargs):
        q, k = args[0], args[1]
        events.append(("attention", q.shape[1], k.shape[1], kwargs.get("skip_reshape", False)))
        return func(*args, **kwargs)

    unet = comfy_model.unet_of(sd15)
    to_k = [m.attn2.to_k for m in unet.modules() if hasattr(m, "attn2")]
    handles = [m.register_forward_hook(lambda *_: events.append(("to_k",))) for m in to_k]
    m = sd15.clone()
    m.model_options.setdefault("transformer_options", {})[comfy_model.ATTENTION_OVERRIDE] = override
    positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    try:
        ksample(m, positive, positive, steps=1, size=8)
    finally:
        for h in handles:
            h.remove()
    after_k = [events[i + 1] for i, e in enumerate(events) if e == ("to_k",)]
    assert after_k and all(e[0] == "attention" and e[2] == 77 and not e[3] for e in after_k)
    self_attention = [e for e in events if e[0] == "attention" and e[2] != 77]
    assert len(self_attention) == len(after_k), "attn1 goes through the override too"


def test_attention_override_chains_and_restores_the_call_options():
    calls = []

    def theirs(func, *args, **kwargs):
        calls.append("theirs")
        return func(*args, **kwargs)

    def ours(previous):
        def attend(func, *args, **kwargs):
            calls.append("ours")
            return previous(func, *args, **kwargs)
        return attend

    options = {comfy_model.ATTENTION_OVERRIDE: theirs}
    with comfy_model.attention_override(options, ours):
        options[comfy_model.ATTENTION_OVERRIDE](lambda *a, **k: None, 1, 2, 3, 4)
    assert calls == ["ours", "theirs"] and options == {comfy_model.ATTENTION_OVERRIDE: theirs}
    empty = {}
    with comfy_model.attention_override(empty, None):
        assert empty == {}
    with comfy_model.attention_override(empty, ours):
        assert comfy_model.ATTENTION_OVERRIDE in empty
    assert empty == {}
