"""LAG with every stock node that touches the conditioning or the model between our nodes and the sampler
(README, "Works with"): the right mask from the right tokens of the right rows, in every batching order
ComfyUI uses (memory forced low makes it run each conditioning entry alone, the negative first), or a clear
error that names what to do instead."""

from contextlib import contextmanager

import comfy.model_management
import comfy.samplers
import pytest
import torch
from comfy_env import concept_residual, run
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
from comfy_extras.nodes_freelunch import FreeU_V2
from comfy_extras.nodes_hypertile import HyperTile
from comfy_extras.nodes_model_advanced import RescaleCFG
from comfy_extras.nodes_pag import PerturbedAttentionGuidance
from comfy_extras.nodes_sag import SelfAttentionGuidance
from comfy_extras.nodes_tomesd import TomePatchModel
from personalized_residuals.nodes import lag as lag_node
from personalized_residuals.nodes.lag import PATCH_KEY, LagSampler
from personalized_residuals.residual_core import ResidualError
from personalized_residuals.residual_core.lag import LagSession

import nodes as comfy_nodes

PROMPT = "a photo of a sks dog on the beach"  # sks dog: tokens 5 and 6
OTHER = "a red car parked in a city street at night"
LONG = ", ".join(["a very long description of a sunny beach with palm trees and waves"] * 7)  # 3 chunks of 77
SIZE = 16  # latent 16x16 (128 px)


@pytest.fixture(scope="module")
def lagged(sd15, clip):
    """(LAG model, LAG positive, negative, encode) with a soft mask, so masks are graded and differ by row."""
    m, positive = run(LagSampler, sd15, concept_residual(sd15), clip, PROMPT, strength=1.0, mode="LAG",
                      mask_rule="soft", mask_value=1.0, start_percent=0.0, end_percent=1.0)
    encode = lambda text: comfy_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    return m, positive, encode(""), encode


class Record:
    """What LAG applied in one block of one UNet call."""

    def __init__(self, evaluation, session):
        call = session.call
        self.evaluation, self.chunks = evaluation, list(call.layout.cond_or_uncond or [0])
        self.frames, self.lag = list(call.frames), {i: cols.tolist() for i, cols in call.lag}


@contextmanager
def observed(monkeypatch, low_memory=False):
    """Records every mask LAG applies, per model evaluation; with low_memory, ComfyUI runs each entry alone."""
    records, evaluations, passes = [], [0], []
    applied, evaluate, merge = LagSession.applied, comfy.samplers.calc_cond_batch, lag_node.merge_cond_passes

    def spy_applied(self, block, grid, mask, score):
        r = Record(evaluations[0], self)
        r.block, r.grid, r.mask = block, grid, mask.clone()
        records.append(r)
        return applied(self, block, grid, mask, score)

    def spy_evaluate(*args, **kwargs):
        evaluations[0] += 1
        return evaluate(*args, **kwargs)

    def spy_merge(*args, **kwargs):
        passes.append(evaluations[0])
        return merge(*args, **kwargs)

    monkeypatch.setattr(LagSession, "applied", spy_applied)
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", spy_evaluate)
    monkeypatch.setattr(lag_node, "merge_cond_passes", spy_merge)
    if low_memory:  # only the sampler's batching sees it (attention kernels ask too, and split their work)
        monkeypatch.setattr(comfy.samplers, "model_management", _LowMemory())
    yield records, passes
    monkeypatch.undo()


class _LowMemory:
    def __getattr__(self, name):
        return getattr(comfy.model_management, name)

    def get_free_memory(self, *args, **kwargs):
        return 0


def assert_one_mask_per_sample_and_region(records):
    """In each evaluation and block, every chunk of one region (the LAG prompt's, the negative's, a combined
    prompt's) got the same mask, row by row, whichever call it ran in; and LAG did apply somewhere."""
    seen = {}
    for r in records:
        rows = r.mask.shape[0] // len(r.chunks)
        for i, frame in enumerate(r.frames):
            mask = r.mask[i * rows:(i + 1) * rows]
            key = (r.evaluation, r.block, frame)
            if key in seen:
                torch.testing.assert_close(mask, seen[key], rtol=0, atol=0,
                                           msg=f"evaluation {r.evaluation}, block {r.block}, region {frame}")
            else:
                seen[key] = mask
    assert records and any(float(m.sum()) > 0 for m in seen.values()), "LAG applied no mask: the test means nothing"
    assert any(r.lag for r in records) and any(len(r.lag) < len(r.chunks) for r in records), "LAG chunks and followers"


def sample(model, positive, negative, steps=2, cfg=4.0, batch=1, latent=None):
    latent = latent or {"samples": torch.zeros(batch, 4, SIZE, SIZE)}
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def both_orders(monkeypatch, model, positive, negative, same_image=True, **kw):
    """Sample with normal and with low memory: same masks per sample in each, and the same image (unless a
    patch draws random numbers per call, as ToMe and HyperTile do)."""
    out = {}
    for low in (False, True):
        with observed(monkeypatch, low) as (records, passes):
            out[low] = sample(model, positive, negative, **kw)
        assert_one_mask_per_sample_and_region(records)
        out[(low, "records")], out[(low, "passes")] = records, passes
    if same_image:
        scale = float(out[False].abs().max())
        torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-4 * scale)
    return out


# ---------------------------------------------------------------- conditioning nodes


def test_set_area_copy_beside_the_full_prompt(lagged, monkeypatch):
    """The issue's reproduction: ConditioningCombine(LAG positive, ConditioningSetArea(LAG positive, 32x32 at 0,0)),
    a 16x16 latent. The area copy is a LAG chunk of its own region, with its own mask."""
    m, positive, negative, _ = lagged
    area = comfy_nodes.ConditioningSetArea().append(positive, 32, 32, 0, 0, 1.0)[0]
    out = both_orders(monkeypatch, m, comfy_nodes.ConditioningCombine().combine(positive, area)[0], negative)
    frames = {f for r in out[(False, "records")] for f in r.frames}
    assert frames == {None, (0, 0, 4, 4)}
    assert any(r.lag and set(r.frames) == {(0, 0, 4, 4)} for r in out[(False, "records")]), "the area copy's own mask"
    assert out[(True, "passes")], "low memory ran the negative first: LAG ran its entries first instead"


def test_set_area_alone_gives_the_negative_the_areas_mask_in_place(lagged, monkeypatch):
    m, positive, negative, _ = lagged
    area = comfy_nodes.ConditioningSetAreaPercentage().append(positive, 0.5, 0.5, 0.25, 0.25, 1.0)[0]
    out = both_orders(monkeypatch, m, area, negative)
    follower = [r for r in out[(False, "records")] if r.frames == [None]]
    assert follower, "the negative (whole latent) ran in a call of its own"
    for r in follower:  # outside the area the LAG prompt is not sampled: no residual there
        h, w = r.grid
        grid = r.mask.view(-1, h, w)
        assert float(grid[:, : h // 4].abs().sum()) == 0 and float(grid[:, :, : w // 4].abs().sum()) == 0


@pytest.mark.parametrize("set_cond_area", ["default", "mask bounds"])
def test_set_mask(lagged, monkeypatch, set_cond_area):
    m, positive, negative, _ = lagged
    mask = torch.zeros(1, 8 * SIZE, 8 * SIZE)
    mask[:, :, : 4 * SIZE] = 1.0
    masked = comfy_nodes.ConditioningSetMask().append(positive, mask, set_cond_area, 1.0)[0]
    both_orders(monkeypatch, m, masked, negative)


def test_combine_with_another_prompt_takes_its_mask_from_the_lag_prompt(lagged, monkeypatch):
    m, positive, negative, encode = lagged
    out = both_orders(monkeypatch, m, comfy_nodes.ConditioningCombine().combine(positive, encode(OTHER))[0], negative)
    for r in out[(False, "records")]:
        assert len(r.lag) == 1 and len(r.chunks) == 3, "one LAG chunk (ours), the other prompt and the negative follow"


@pytest.mark.parametrize("order", ["lag_first", "lag_second"])
def test_concat_finds_the_words_where_they_are(lagged, monkeypatch, order):
    m, positive, negative, encode = lagged
    pair = (positive, encode(OTHER)) if order == "lag_first" else (encode(OTHER), positive)
    concat = comfy_nodes.ConditioningConcat().concat(*pair)[0]
    assert concat[0][0].shape[1] == 154
    out = both_orders(monkeypatch, m, concat, negative)
    expected = [5, 6] if order == "lag_first" else [82, 83]
    columns = {tuple(c) for r in out[(False, "records")] for c in r.lag.values()}
    assert columns == {tuple(expected)}, "the concept's own tokens, not the other prompt's end tokens"


def test_prompts_of_different_lengths_batched_together(lagged, monkeypatch, clip):
    """A 77-token LAG prompt beside a 231-token prompt: ComfyUI repeats ours three times to batch them."""
    m, positive, negative, encode = lagged
    long = encode(LONG)
    copies = long[0][0].shape[1] // 77
    assert copies >= 2
    out = both_orders(monkeypatch, m, comfy_nodes.ConditioningCombine().combine(positive, long)[0], negative)
    columns = {tuple(c) for r in out[(False, "records")] for c in r.lag.values()}
    assert tuple(p + 77 * i for i in range(copies) for p in (5, 6)) in columns, "every copy of the repeated prompt"


def test_average_at_full_strength_works_and_below_it_is_a_clear_error(lagged, monkeypatch):
    m, positive, negative, encode = lagged
    full = comfy_nodes.ConditioningAverage().addWeighted(positive, encode(OTHER), 1.0)[0]
    both_orders(monkeypatch, m, full, negative)
    half = comfy_nodes.ConditioningAverage().addWeighted(positive, encode(OTHER), 0.5)[0]
    with pytest.raises(ResidualError, match="ConditioningAverage"):
        sample(m, half, negative)


def test_zero_out_on_the_negative_works_and_on_the_positive_is_a_clear_error(lagged, monkeypatch):
    m, positive, negative, _ = lagged
    both_orders(monkeypatch, m, positive, comfy_nodes.ConditioningZeroOut().zero_out(negative)[0])
    with pytest.raises(ResidualError, match="ConditioningZeroOut"):
        sample(m, comfy_nodes.ConditioningZeroOut().zero_out(positive)[0], negative)


def test_timestep_range_applies_only_while_the_lag_prompt_is_sampled(lagged, monkeypatch):
    m, positive, negative, encode = lagged
    first = comfy_nodes.ConditioningSetTimestepRange().set_range(positive, 0.0, 0.5)[0]
    second = comfy_nodes.ConditioningSetTimestepRange().set_range(encode(OTHER), 0.5, 1.0)[0]
    both = comfy_nodes.ConditioningCombine().combine(first, second)[0]
    out = both_orders(monkeypatch, m, both, negative, steps=4)
    evaluations = {r.evaluation for r in out[(False, "records")] if r.lag}
    assert 0 < len(evaluations) < 4, "LAG masks only in the steps where the LAG prompt runs"


def test_controlnet_apply_advanced(lagged, monkeypatch, sd15):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from comfyui_models import randomize, unet_config

    cfg = {k: v for k, v in unet_config(model_channels=32, context_dim=32).items()
           if k not in ("out_channels", "transformer_depth_output", "use_temporal_attention", "use_temporal_resblock")}
    with torch.inference_mode():
        control = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **cfg)
        randomize(control, 7)
    cn = comfy.controlnet.ControlNet(control, load_device=torch.device("cpu"), manual_cast_dtype=None)
    m, positive, negative, _ = lagged
    image = torch.rand(1, 8 * SIZE, 8 * SIZE, 3)
    pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, cn, image, 1.0, 0.0, 1.0)
    out = both_orders(monkeypatch, m, pos, neg)
    assert not torch.allclose(out[False], sample(m, positive, negative), atol=1e-4), "the ControlNet must act"


# ---------------------------------------------------------------- model patches after the LAG node


def _model(out):
    """The MODEL output of a stock node, V1 (a tuple) or V3 (a NodeOutput)."""
    return out[0] if isinstance(out, tuple) else out.result[0]


MODEL_PATCHES = {  # name: (patch, same image in every batching order)
    "FreeU_V2": (lambda m: FreeU_V2().patch(m, 1.3, 1.4, 0.9, 0.2), True),
    "PerturbedAttentionGuidance": (lambda m: PerturbedAttentionGuidance.execute(m, 3.0), True),
    "SelfAttentionGuidance": (lambda m: SelfAttentionGuidance.execute(m, 0.5, 2.0), True),
    "HyperTile": (lambda m: HyperTile.execute(m, 64, 2, 0, False), False),
    "TomePatchModel": (lambda m: TomePatchModel.execute(m, 0.3), False),
    "RescaleCFG": (lambda m: RescaleCFG().patch(m, 0.7), True),
}


@pytest.mark.parametrize("name", MODEL_PATCHES)
def test_model_patch_after_lag(lagged, monkeypatch, name):
    """The patch node clones the LAG node's MODEL: the clone shares its LAG patch, so LAG applies and the
    mask preview on the LAG node's MODEL shows the run."""
    m, positive, negative, _ = lagged
    patch, same_image = MODEL_PATCHES[name]
    with torch.inference_mode():
        patched = _model(patch(m))
    assert patched.get_attachment(PATCH_KEY) is m.get_attachment(PATCH_KEY)
    both_orders(monkeypatch, patched, positive, negative, same_image)
    assert m.get_attachment(PATCH_KEY).sessions[0].mean_masks()


def test_differential_diffusion(lagged, monkeypatch):
    m, positive, negative, _ = lagged
    with torch.inference_mode():
        patched = _model(DifferentialDiffusion.execute(m))
    ramp = torch.linspace(0, 1, SIZE * 8).view(1, 1, -1).expand(1, SIZE * 8, SIZE * 8).contiguous()
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE), "noise_mask": ramp}
    both_orders(monkeypatch, patched, positive, negative, latent=latent)


# ---------------------------------------------------------------- other sampler entries


def test_ksampler_advanced_with_start_and_end_steps(lagged, monkeypatch):
    m, positive, negative, _ = lagged
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    for low in (False, True):
        with observed(monkeypatch, low) as (records, _):
            with torch.inference_mode():
                comfy_nodes.KSamplerAdvanced().sample(m, "enable", 0, 4, 4.0, "euler", "normal", positive, negative,
                                                      latent, 1, 3, "disable")
        assert_one_mask_per_sample_and_region(records)
        assert max(r.evaluation for r in records) == 2, "steps 1 and 2 of 4"


def test_sampler_custom_advanced_with_a_cfg_guider(lagged, monkeypatch):
    m, positive, negative, _ = lagged
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(positive, negative)
    guider.set_cfg(4.0)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "normal", 2)
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    for low in (False, True):
        with observed(monkeypatch, low) as (records, _):
            with torch.inference_mode():
                custom = SamplerCustomAdvanced().sample(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"),
                                                        sigmas, latent)[0]["samples"]
        assert_one_mask_per_sample_and_region(records)
    torch.testing.assert_close(custom, sample(m, positive, negative), rtol=0, atol=1e-4 * float(custom.abs().max()))


def test_a_batch_of_latents_each_with_its_own_mask(lagged, monkeypatch):
    m, positive, negative, _ = lagged
    out = both_orders(monkeypatch, m, positive, negative, batch=2)
    masks = [r.mask for r in out[(False, "records")] if len(r.chunks) == 2]
    assert any(not torch.equal(mk[0], mk[1]) for mk in masks), "each sample of the batch has its own mask"


def test_two_pass_merge_equals_comfyuis_single_pass(sd15, clip):
    """The pin on calc_cond_batch's arithmetic that the reordering relies on: running the entries of its lists
    in two calls and merging gives ComfyUI's own result (no LAG here: the plain model)."""
    import comfy.sampler_helpers
    from personalized_residuals.nodes.comfy_model import merge_cond_passes

    encode = lambda text: comfy_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    positive = comfy_nodes.ConditioningCombine().combine(
        comfy_nodes.ConditioningSetArea().append(encode(PROMPT), 64, 64, 16, 16, 0.7)[0], encode(OTHER))[0]
    guider = comfy.samplers.CFGGuider(sd15)
    guider.set_conds(positive, encode(""))
    x = torch.randn(1, 4, SIZE, SIZE)
    with torch.inference_mode():
        sd15.pre_run()
        comfy.model_management.load_models_gpu([sd15])
        conds = {k: comfy.sampler_helpers.convert_cond(v) for k, v in (("positive", positive), ("negative", encode("")))}
        conds = comfy.samplers.process_conds(sd15.model, x, conds, x.device)
        lists = [conds["positive"], conds["negative"]]
        sigma = torch.tensor([5.0])
        whole = comfy.samplers.calc_cond_batch(sd15.model, lists, x, sigma, {})
        parts = [[lists[0][:1], lists[1]], [lists[0][1:], []]]
        merged = merge_cond_passes([(p, comfy.samplers.calc_cond_batch(sd15.model, p, x, sigma, {})) for p in parts],
                                   x, sigma)
    for a, b in zip(whole, merged, strict=True):  # float32 rounding of the weighted sums, relative to their size
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * float(a.abs().max()))


@pytest.mark.server
@pytest.mark.parametrize("size", [128, 192])
def test_set_area_over_the_http_api(trained, client, size):
    """The same set-up through a real server: load_and_sample with its positive combined with a 64x64 px
    ConditioningSetArea copy of itself (the smallest the node accepts over the API: /prompt refuses the 32 px
    of the in-process test), and the mask preview after it."""
    from comfy_server import api_client, api_workflow

    node_of = api_client().node_of
    graph = api_workflow("load_and_sample", EmptyLatentImage={"width": size, "height": size})
    lag, sampler = node_of(graph, "PersonalizedResidualLAGSampler"), node_of(graph, "KSampler")
    graph["area"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": [lag, 1], "width": 64, "height": 64,
                                                                     "x": 0, "y": 0, "strength": 1.0}}
    graph["combined"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": [lag, 1],
                                                                         "conditioning_2": ["area", 0]}}
    graph[sampler]["inputs"]["positive"] = ["combined", 0]
    run = client.run(graph)
    assert run.error is None, run.error
    assert run.history["status"]["status_str"] == "success"
    assert run.images(node_of(graph, "PersonalizedResidualLAGMaskPreview"))
