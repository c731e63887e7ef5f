"""LAG on Flux through the core (residual_core.attach with the FLUX family), on ComfyUI's own Flux class (small,
random weights): maps from the joint attention through the attention override, masks on the image tokens of
img_attn.proj and linear2, text rows of linear2 as unmaskable layers."""

import pytest
import torch
from comfy_env import SKIPPED

pytestmark = pytest.mark.skipif(SKIPPED is not None, reason=str(SKIPPED))

TEXT, LATENT = 6, (8, 12)  # 6 text tokens; an 8x12 latent: 4x6 = 24 image tokens


@pytest.fixture(scope="module")
def flux():
    from comfyui_models import build_flux

    return build_flux()


def residual(flux, seed=1, unmaskable="global"):
    from personalized_residuals.residual_core import ResidualSet
    from personalized_residuals.residual_core.family import FLUX

    r = ResidualSet.for_targets(FLUX.targets(flux.model.diffusion_model), 0.25, init="random", seed=seed)
    r.unmaskable = unmaskable
    return r


def sample_call(flux, x, context, concepts=(), override=None, steps=1):
    """`steps` calls of the DiT on the same input, LAG's concepts attached to each as ComfyUI's wrapper would."""
    from personalized_residuals.nodes.comfy_model import attention_override
    from personalized_residuals.residual_core import CallLayout, attach
    from personalized_residuals.residual_core.family import FLUX

    dit = flux.model.diffusion_model
    outs = []
    for _ in range(steps):
        for c in concepts:
            if c.lag is not None:
                c.lag.begin_evaluation()
        options = {} if override is None else {"optimized_attention_override": override}
        layout = CallLayout([0], context, size=tuple(x.shape[-2:]))
        with torch.inference_mode(), attach(dit, list(concepts), call=layout, family=FLUX) as attached, \
                attention_override(options, attached.attention_override):
            outs.append(dit(x, torch.tensor([0.5]), context, y=torch.zeros(1, 32), guidance=torch.tensor([3.5]),
                            transformer_options=options))
    return outs


def lag(rule=("max_fraction", 0.5), strategy="per_block", positions=(2, 3)):
    from personalized_residuals.residual_core import LagSession

    return LagSession(list(positions), TEXT, *rule, strategy=strategy)


def test_ones_give_the_global_residual_zeros_the_base_and_the_model_is_unchanged(flux):
    from personalized_residuals.residual_core import Concept

    torch.manual_seed(0)
    x, context = torch.randn(1, 16, *LATENT), torch.randn(1, TEXT, 32)
    before = {k: v.clone() for k, v in flux.model.diffusion_model.state_dict().items()}
    r = residual(flux)
    base = sample_call(flux, x, context)[0]
    everywhere = sample_call(flux, x, context, [Concept(r)])[0]
    ones = sample_call(flux, x, context, [Concept(r, 1.0, lag(("max_fraction", 1e-9)))])[0]
    # zero masks (the warm-up's first step), the text rows of linear2 left out: the base model
    warming = sample_call(flux, x, context, [Concept(residual(flux, unmaskable="skip"), 1.0, lag(strategy="warmup"))])[0]
    half = sample_call(flux, x, context, [Concept(r, 1.0, lag())])[0]
    assert not torch.equal(base, everywhere)
    assert torch.equal(ones, everywhere), "a mask of ones is the global residual"
    assert torch.equal(warming, base), "a mask of zeros is the base model"
    assert not torch.equal(half, base) and not torch.equal(half, everywhere)
    after = flux.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model's weights changed"


def test_masks_lie_on_the_patch_grid_of_every_block_and_text_rows_follow_the_unmaskable_policy(flux):
    from personalized_residuals.residual_core import Concept

    torch.manual_seed(1)
    x, context = torch.randn(1, 16, *LATENT), torch.randn(1, TEXT, 32)
    session = lag()
    sample_call(flux, x, context, [Concept(residual(flux), 1.0, session)])
    dit = flux.model.diffusion_model
    blocks = [("double", i) for i in range(len(dit.double_blocks))] + [("single", i) for i in range(len(dit.single_blocks))]
    means = session.mean_masks()
    assert sorted(means) == sorted(blocks)
    assert all(m.shape == (1, 24) and 0 < float(m.mean()) < 1 for m in means.values())
    ones = ("max_fraction", 1e-9)
    kept = sample_call(flux, x, context, [Concept(residual(flux), 1.0, lag(ones))])[0]
    skipped = sample_call(flux, x, context, [Concept(residual(flux, unmaskable="skip"), 1.0, lag(ones))])[0]
    assert not torch.equal(kept, skipped), "the text rows of linear2 were not left out with 'skip'"


def test_another_nodes_override_still_runs_and_two_concepts_never_overlap(flux):
    from personalized_residuals.residual_core import Concept

    torch.manual_seed(2)
    x, context = torch.randn(1, 16, *LATENT), torch.randn(1, TEXT, 32)
    calls = []

    def theirs(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs) * 0.5

    a, b = lag(positions=(1, 2)), lag(positions=(4, 5))
    applied = []
    record = type(a).applied

    def spy(self, block, grid, mask, score):
        applied.append((self, block, mask.clone()))
        return record(self, block, grid, mask, score)

    type(a).applied = spy
    try:
        out = sample_call(flux, x, context, [Concept(residual(flux, 1), 1.0, a), Concept(residual(flux, 2), 1.0, b)],
                          override=theirs, steps=2)
    finally:
        type(a).applied = record
    dit = flux.model.diffusion_model
    assert len(calls) == 2 * (len(dit.double_blocks) + len(dit.single_blocks)), "their override saw every attention"
    theirs_alone = sample_call(flux, x, context, override=theirs)[0]
    assert not torch.equal(out[0], theirs_alone)
    by_block = {}
    for s, block, mask in applied:
        by_block.setdefault(block, {}).setdefault(s is a, []).append(mask)
    for per in by_block.values():
        for ma, mb in zip(per[True], per[False], strict=True):
            assert not (ma * mb).any(), "two concepts' masks overlap"


@pytest.fixture(scope="module", params=["flux", "chroma"])
def dit(request, flux):
    """The node-level tests run on Flux.1 and on Chroma (Flux's blocks without their modulation layers, another
    call signature and in-place adds on the image stream too): the same family description but for those."""
    from comfyui_models import build_chroma

    return flux if request.param == "flux" else build_chroma()


@pytest.fixture(scope="module")
def flux_clip():
    from comfyui_models import build_flux_clip

    return build_flux_clip()


PROMPT = "a photo of a sks dog on the beach"


def test_lag_sampler_on_flux_through_the_ksampler(dit, flux_clip, loras_dir, monkeypatch):
    """The LAG Sampler node on a Flux model, sampled by the stock KSampler (cfg 1, guidance-distilled as dev is):
    one model evaluation per step, the model unchanged after, mode global equal to the saved file in ComfyUI's own
    LoRA loading, and LAG neither of them nor the base."""
    from comfy_env import concept_residual, ksample, run, spy_sampling, stock_lora, weights_hash
    from personalized_residuals.nodes.lag import PATCH_KEY, LagMaskPreview, LagSampler

    import nodes as comfy_nodes

    residual = concept_residual(dit, seed=4)
    negative = comfy_nodes.CLIPTextEncode().encode(flux_clip, "")[0]
    settings = {"strength": 1.0, "mask_rule": "max_fraction", "mask_value": 0.5, "start_percent": 0.0,
                "end_percent": 1.0, "mask_strategy": "per_block"}
    before = weights_hash(dit)
    sample = lambda m, positive: ksample(m, positive, negative, cfg=1.0, steps=3, size=8, channels=16)  # noqa: E731
    lagged, positive = run(LagSampler, dit, residual, flux_clip, PROMPT, mode="LAG", **settings)
    spy = spy_sampling(monkeypatch)
    lag_out = sample(lagged, positive)
    assert len(spy.evaluations) == 3, "one model evaluation per step"
    means = lagged.get_attachment(PATCH_KEY).sessions[0].mean_masks()
    assert len(means) == 4 and all(m.shape == (1, 16) for m in means.values())  # a mask per block on the 4x4 patches
    assert any(0 < float(m.mean()) < 1 for m in means.values()), "LAG masked nothing anywhere"
    preview = run(LagMaskPreview, lagged, {"samples": lag_out})[0]  # the 4x4 patch grid drawn over the 8x8 latent
    assert preview.shape == (1, 64, 64, 3) and 0 < float(preview.mean()) < 1
    everywhere = sample(run(LagSampler, dit, residual, flux_clip, PROMPT, mode="global", **settings)[0], positive)
    stock = sample(stock_lora(dit, residual, loras_dir), positive)
    base = sample(dit, positive)
    torch.testing.assert_close(everywhere, stock, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stock, base, atol=1e-4), "the stock loader did not apply the saved file"
    assert not torch.allclose(lag_out, everywhere, atol=1e-4) and not torch.allclose(lag_out, base, atol=1e-4)
    assert weights_hash(dit) == before, "the model changed"


def test_train_personalized_residual_on_flux_and_sample_it_with_lag(dit, flux_clip, loras_dir):
    """Training on Flux through ComfyUI's own model call (rectified flow: the target is eps - x0 at the model's own
    sigmas; guidance: the conditioning's default): a residual from zeros gets gradients on every layer, the
    model is unchanged, the file loads in the stock loader and LAG Sampler samples with it."""
    from comfy_env import ksample, run, stock_lora, train, weights_hash
    from comfyui_models import build_vae
    from personalized_residuals.nodes.comfy_model import targets_of
    from personalized_residuals.nodes.lag import LagSampler
    from personalized_residuals.residual_core import model_family

    import nodes as comfy_nodes

    before = weights_hash(dit)
    vae, photos = build_vae(16), [torch.rand(1, 64, 64, 3)]
    residual, curve, _ = train(dit, flux_clip, vae, photos, steps=4, batch_size=1)
    recomputed = train(dit, flux_clip, vae, photos, steps=4, batch_size=1, gradient_checkpointing=True)[0]
    for key, layer in residual.layers.items():  # gradient checkpointing recomputes the same blocks, hooks included
        torch.testing.assert_close(recomputed.layers[key].weight_delta(), layer.weight_delta())
    assert residual.meta.base_family == model_family(targets_of(dit)) == "custom-flux-2+2x64"
    assert all(float(layer.up.abs().sum()) > 0 for layer in residual.layers.values()), "a layer got no gradient"
    assert weights_hash(dit) == before, "training changed the model"
    assert curve.ndim == 4 and curve.shape[-1] == 3
    negative = comfy_nodes.CLIPTextEncode().encode(flux_clip, "")[0]
    sample = lambda m, p: ksample(m, p, negative, cfg=1.0, steps=2, size=8, channels=16)  # noqa: E731
    lagged, positive = run(LagSampler, dit, residual, flux_clip, PROMPT, strength=1.0, mode="LAG",
                           mask_rule="max_fraction", mask_value=0.5, start_percent=0.0, end_percent=1.0)
    assert torch.isfinite(sample(lagged, positive)).all()
    assert not torch.equal(sample(stock_lora(dit, residual, loras_dir), positive), sample(dit, positive))


def flux_lora(path, dit, select, scale=0.3):
    """A random rank-2 kohya-named Flux LoRA on every layer of the DiT whose path `select`s (flux_files.py)."""
    from flux_files import write_flux_lora

    shapes = {k: tuple(w.shape) for k, w in dit.model.diffusion_model.state_dict().items()}
    write_flux_lora(path, shapes, select, scale=scale)
    return path.name


AFTER_ATTENTION = ("img_attn.proj", "img_mlp.0", "img_mlp.2", "linear2")  # maskable layers that run after the map
UNMASKABLE = ("txt_attn.qkv", "txt_mlp.0", "img_mod.lin", "modulation.lin", "final_layer.linear")


def test_lag_lora_on_flux_masks_the_image_stream_ones_are_the_stock_loader_and_zeros_skipped_the_base(
        dit, flux_clip, loras_dir, monkeypatch):
    from comfy_env import ksample, run
    from personalized_residuals.nodes.lag import PATCH_KEY
    from personalized_residuals.nodes.lora import LagLora
    from personalized_residuals.residual_core import lag

    import nodes as comfy_nodes

    name = flux_lora(loras_dir / "flux.safetensors", dit, lambda p: p.endswith(AFTER_ATTENTION + UNMASKABLE))
    negative = comfy_nodes.CLIPTextEncode().encode(flux_clip, "")[0]
    sample = lambda m, p: ksample(m, p, negative, cfg=1.0, steps=2, size=8, channels=16)  # noqa: E731

    def lag_lora(unmaskable):
        return run(LagLora, model=dit, clip=flux_clip, lora_name=name, trigger_word="sks", class_word="dog",
                   prompt=PROMPT, strength=1.0, unmaskable_layers=unmaskable, mask_rule="max_fraction", mask_value=0.5,
                   start_percent=0.0, end_percent=1.0)

    m, positive, _ = lag_lora("apply globally")
    masked = m.get_attachment(PATCH_KEY).concepts[0].residual.layers
    blocks = dit.model.diffusion_model
    assert len(masked) == 3 * len(blocks.double_blocks) + len(blocks.single_blocks)
    assert all(p.endswith(AFTER_ATTENTION) for p in masked), "only the image stream's layers are masked"
    stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(dit, name, 1.0)[0]
    base = sample(dit, positive)
    assert (sample(stock, positive) - base).abs().max() > 1e-3, "the LoRA must matter for this test to mean anything"
    monkeypatch.setattr(lag, "threshold", lambda attn, rule, v: torch.ones_like(attn))
    # Merged weights compute (W + dW) x, the hooks W x + dW x: equal up to float32 rounding.
    torch.testing.assert_close(sample(m, positive), sample(stock, positive), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(lag, "threshold", lambda attn, rule, v: torch.zeros_like(attn))
    skipped = lag_lora("skip")[0]
    assert torch.equal(sample(skipped, positive), base), "zero masks and the unmaskable layers skipped: the base"


def test_two_flux_loras_chained_each_in_its_own_mask_in_one_pass_per_step(dit, flux_clip, loras_dir, monkeypatch):
    """The multi-character case: two LAG LoRAs on one Flux model, the last node's prompt naming both; one model
    evaluation per step and, block by block, masks that never overlap."""
    from comfy_env import ksample, run, spy_sampling
    from personalized_residuals.nodes.lora import LagLora

    import nodes as comfy_nodes

    prompt = "a photo of a sks dog and a zwx cat"
    names = [flux_lora(loras_dir / f"{n}.safetensors", dit, lambda p, n=n: p.endswith(AFTER_ATTENTION), scale=s)
             for n, s in (("a", 0.3), ("b", 0.2))]
    m = dit
    for name, (ident, cls) in zip(names, (("sks", "dog"), ("zwx", "cat")), strict=True):
        m, positive, _ = run(LagLora, model=m, clip=flux_clip, lora_name=name, trigger_word=ident, class_word=cls,
                             prompt=prompt, strength=1.0, unmaskable_layers="apply globally", mask_rule="max_fraction",
                             mask_value=0.5, start_percent=0.0, end_percent=1.0)
    spy = spy_sampling(monkeypatch)
    negative = comfy_nodes.CLIPTextEncode().encode(flux_clip, "")[0]
    out = ksample(m, positive, negative, cfg=1.0, steps=3, size=8, channels=16)
    assert torch.isfinite(out).all() and len(spy.evaluations) == 3
    pairs = [(a.mask, b.mask) for a, b in spy.pairs()]
    assert pairs and all(float((a * b).max()) == 0 for a, b in pairs), "two concepts' masks overlap"
    assert any(float(a.sum()) > 0 for a, _ in pairs) and any(float(b.sum()) > 0 for _, b in pairs)
