"""Property tests (hypothesis): the file loader on random and mutated files, the token matcher on random
prompts and words, the mask rules on random maps, values and shapes."""

import math

import pytest
import safetensors.torch
import torch
from helpers import END, START, WordTokenizer, tiny_unet
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from personalized_residuals.residual_core import (
    CallLayout,
    Concept,
    LagSession,
    ResidualError,
    ResidualMeta,
    ResidualSet,
    attach,
    fileformat,
    find_targets,
    locate_concept,
)
from personalized_residuals.residual_core.lag import MASK_RULES, check_rule, threshold

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- the file loader

def _valid_bytes(use_linear: bool) -> bytes:
    meta = ResidualMeta(class_word="dog", identifier="sks", steps=150, lr=1e-3)
    residual = ResidualSet.for_targets(find_targets(tiny_unet(use_linear)), 0.25, "random", seed=1, meta=meta)
    return safetensors.torch.save(fileformat.to_state_dict(residual), metadata=fileformat.metadata(residual))


VALID = {False: _valid_bytes(False), True: _valid_bytes(True)}


def _load_is_clean(path) -> None:
    """Loading either refuses with a ResidualError or gives a residual that is fully usable."""
    try:
        residual = fileformat.load(str(path))
    except ResidualError as e:
        event(f"refused: {str(e)[:30]}")
        return
    event("loaded")
    assert residual.layers
    for layer in residual.layers.values():
        assert layer.rank >= 1 and math.isfinite(layer.scale)
        assert torch.isfinite(layer.down).all() and torch.isfinite(layer.up).all()
    again = path.with_name("again.safetensors")
    again.unlink(missing_ok=True)
    fileformat.save(residual, str(again))
    reloaded = fileformat.load(str(again))
    for key, layer in residual.layers.items():  # whatever loads, saves and loads back bit for bit
        assert torch.equal(reloaded.layers[key].up, layer.up) and torch.equal(reloaded.layers[key].down, layer.down)


@SETTINGS
@given(data=st.binary(max_size=512))
def test_random_bytes_are_refused_with_a_residual_error(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    _load_is_clean(path)


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
)


@SETTINGS
@given(use_linear=st.booleans(), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_residual_files_load_cleanly_or_are_refused(tmp_path, use_linear, mutations):
    data = bytearray(VALID[use_linear])
    header = int.from_bytes(data[:8], "little") + 8
    for kind, at, arg in mutations:
        at = at % (header + 64) if at % 2 else at % max(1, len(data))  # half of them in or near the header
        if kind == "flip" and data:
            data[at % len(data)] ^= arg
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = bytes([arg])
        elif kind == "delete":
            del data[at:at + arg]
    path = tmp_path / "x.safetensors"
    path.write_bytes(bytes(data))
    _load_is_clean(path)


_LAYERS = ["lora_unet_mid_block_attentions_0_proj_out", "lora_unet_down_blocks_0_attentions_0_proj_out",
           "lora_unet_up_blocks_1_attentions_2_proj_out"]
_DTYPE = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool])
_FILL = st.sampled_from([None] * 16 + [0.0, -2.5, float("nan"), float("inf")])  # None: random values


@st.composite
def _state_dicts(draw):
    """Mostly well-formed kohya layers, each part of which may be off: shape, dtype, values, a missing part,
    a foreign tensor."""
    sd = {}
    conv = draw(st.booleans())
    for key in draw(st.lists(st.sampled_from(_LAYERS), min_size=1, max_size=3, unique=True)):
        r, n_in, n_out = (draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])) for _ in range(3))
        shapes = {".lora_down.weight": [r, n_in], ".lora_up.weight": [n_out, r], ".alpha": []}
        for suffix, shape in shapes.items():
            if draw(st.integers(0, 19)) == 0:
                continue  # a part missing
            shape = shape + [1, 1] if conv and suffix != ".alpha" else shape
            if draw(st.integers(0, 9)) == 0:
                shape = draw(st.lists(st.integers(0, 4), max_size=4))
            dtype = draw(_DTYPE) if draw(st.integers(0, 9)) == 0 else torch.float32
            fill = draw(_FILL)
            t = torch.randn(shape) if fill is None else torch.full(shape, fill)
            sd[key + suffix] = t.to(dtype)
    if draw(st.integers(0, 5)) == 0:
        sd[draw(st.text(min_size=1, max_size=12))] = torch.zeros(1)
    return sd


_META = st.dictionaries(
    st.sampled_from(["format", "format_version", "class_word", "identifier", "rank_fraction", "base_family", "steps",
                     "lr", "seed", "batch_size", "init", "other"]),
    st.one_of(st.sampled_from(["personalized_residual", "1", "2", "0.05", "nan", "-1", "sd1", "zero", "random", ""]),
              st.text(max_size=8)),
    max_size=4,
)


@SETTINGS
@given(sd=_state_dicts(), meta=st.one_of(st.none(), _META))
def test_random_state_dicts_and_metadata_load_cleanly_or_are_refused(tmp_path, sd, meta):
    path = tmp_path / "x.safetensors"
    try:
        safetensors.torch.save_file(sd, str(path), metadata=meta)
    except Exception:  # names or values safetensors itself can't write are not our loader's concern
        assume(False)
    _load_is_clean(path)
    try:
        fileformat.from_state_dict(sd, meta)
    except ResidualError:
        pass


@SETTINGS
@given(use_linear=st.booleans(), layer=st.integers(0, 10), part=st.sampled_from(["lora_down", "lora_up"]),
       shape=st.lists(st.integers(0, 40), min_size=0, max_size=5))
def test_a_reshaped_layer_loads_only_if_it_still_fits_the_model(tmp_path, use_linear, layer, part, shape):
    """The loader and check_fits together: a residual that loads either fits the UNet or is refused by it."""
    unet = tiny_unet(use_linear)
    targets = find_targets(unet)
    sd = fileformat.to_state_dict(ResidualSet.for_targets(targets, 0.25, "random"))
    sd[f"{fileformat.kohya_key(targets[layer].name)}.{part}.weight"] = torch.randn(shape)
    try:
        residual = fileformat.from_state_dict(sd)
    except ResidualError:
        return
    try:
        residual.check_fits(targets)
    except ResidualError:
        return
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 5, 16)
    with torch.no_grad(), attach(unet, [Concept(residual)]):
        assert torch.isfinite(unet(x, t, ctx)).all()


# ---------------------------------------------------------------- the token matcher

_WORDS = ["a", "photo", "of", "sks", "dog", "teddybear", "guitar", "amplifier", "zwx", "on", "beach", "cat", "red"]
_MULTI = {"teddybear": ["teddy", "bear"], "amplifier": ["amp", "lifier"]}


def _prompt_part():
    word = st.sampled_from(_WORDS)
    weighted = st.tuples(st.lists(word, min_size=1, max_size=3), st.floats(0.1, 2.0)).map(
        lambda p: f"({' '.join(p[0])}:{p[1]:.1f})")
    return st.one_of(word, weighted, st.text(alphabet=" ,.!()", max_size=3))


def _phrase():
    """Mostly one or two words; sometimes empty, or punctuation only (no tokens)."""
    word = st.sampled_from(_WORDS)
    return st.one_of(word, word, st.tuples(word, word).map(" ".join), st.text(alphabet=" !?", max_size=2))


def _content_ids(tok, text):
    """(position, id) of the word tokens of `text`, chunk by chunk, as the tokenizer frames them."""
    out, offset = [], 0
    for chunk in tok(text):
        out += [(offset + i, t) for i, t in enumerate(chunk) if t not in (START, END)]
        offset += len(chunk)
    return out


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_prompt_part(), max_size=120), identifier=_phrase(), class_word=_phrase(),
       insert_at=st.one_of(st.none(), st.integers(0, 200)))
def test_token_matcher_finds_exactly_the_concepts_tokens_or_says_which_word_is_missing(parts, identifier, class_word,
                                                                                       insert_at):
    tok = WordTokenizer(multi=_MULTI)
    if insert_at is not None:  # a prompt that does name the concept, somewhere
        parts = [*parts[:insert_at], f"{identifier} {class_word}", *parts[insert_at:]]
    prompt = " ".join(parts)
    content = _content_ids(tok, prompt)
    ids = [t for _, t in content]
    ident_ids = [t for _, t in _content_ids(tok, identifier)]
    class_ids = [t for _, t in _content_ids(tok, class_word)]
    try:
        found = locate_concept(tok, prompt, identifier, class_word)
    except ResidualError as e:
        message = str(e)
        event("refused")
        if "is empty" in message or "has no tokens" in message:
            assert not ident_ids or not class_ids
        else:
            assert "is not in the prompt" in message
            assert not _contains(ids, ident_ids) or not _contains(ids, class_ids)
        assert insert_at is None or not ident_ids or not class_ids
        return
    event("found")
    assert ident_ids and class_ids and _contains(ids, ident_ids) and _contains(ids, class_ids)
    by_position = dict(content)
    assert found.positions == sorted(set(found.positions))
    assert all(0 <= p < found.prompt_tokens for p in found.positions)
    assert all(by_position.get(p) in set(ident_ids) | set(class_ids) for p in found.positions), "word tokens only"
    n = len(ident_ids)
    for i in range(len(ids) - n + 1):  # every occurrence of the identifier is marked
        if ids[i:i + n] == ident_ids:
            assert {content[i + j][0] for j in range(n)} <= set(found.positions)


# ---------------------------------------------------------------- the mask rules

def _rule_and_value():
    return st.one_of(
        st.tuples(st.just("max_fraction"), st.floats(0.01, 1.0)),
        st.tuples(st.sampled_from(["median", "mean"]), st.floats(0.01, 10.0)),
        st.tuples(st.just("soft"), st.floats(0.01, 10.0)),
    )


_MAPS = st.tuples(st.integers(1, 4), st.integers(1, 64), st.integers(0, 2**31 - 1),
                  st.sampled_from(["random", "ties", "zeros", "one_hot", "tiny"]))


def _attention(b, n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, n, generator=g)
    if kind == "ties":
        a = (a * 3).floor() / 3
    elif kind == "zeros":
        a = torch.zeros(b, n)
    elif kind == "one_hot":
        a = torch.zeros(b, n).scatter_(1, torch.randint(0, n, (b, 1), generator=g), 1.0)
    elif kind == "tiny":
        a = a * 1e-30
    return a


@settings(max_examples=300, deadline=None)
@given(maps=_MAPS, rule_value=_rule_and_value(), exponent=st.integers(-20, 20))
def test_masks_are_in_0_1_monotone_in_attention_and_scale_free(maps, rule_value, exponent):
    attn = _attention(*maps)
    rule, value = rule_value
    check_rule(rule, value)
    mask = threshold(attn, rule, value)
    assert mask.shape == attn.shape and mask.dtype == attn.dtype
    assert torch.isfinite(mask).all() and (mask >= 0).all() and (mask <= 1).all()
    if rule != "soft":
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    order = attn.argsort(-1)  # higher attention never gets a smaller mask (CPU pow rounds by SIMD lane: 1e-6)
    assert (mask.gather(-1, order).diff(dim=-1) >= (-1e-6 if rule == "soft" else 0)).all()
    top = attn.argmax(-1, keepdim=True)
    if rule in ("max_fraction", "soft") and (attn.amax(-1) > 0).all():
        assert (mask.gather(-1, top) == 1).all(), "the most attended position always gets the residual"
    if rule == "median":
        assert (mask.sum(-1) <= attn.shape[-1] // 2).all()
    if maps[3] != "tiny" or exponent >= 0:  # scaling by a power of two is exact (short of subnormals)
        assert torch.equal(threshold(attn * 2.0**exponent, rule, value), mask), "masks depend on attention ratios only"


@settings(max_examples=200, deadline=None)
@given(rule=st.one_of(st.sampled_from(MASK_RULES), st.text(max_size=6)),
       value=st.one_of(st.floats(), st.integers(-3, 12), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e-300])))
def test_check_rule_accepts_exactly_the_documented_settings(rule, value):
    valid = rule in MASK_RULES and (
        (rule == "max_fraction" and 0 < value <= 1) or (rule == "soft" and 0 < value <= 10)
        or rule in ("median", "mean"))
    if valid:
        check_rule(rule, value)
        assert torch.isfinite(threshold(torch.rand(2, 16), rule, value)).all()
    else:
        with pytest.raises(ResidualError):
            check_rule(rule, value)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.sampled_from([0, 1]), min_size=1, max_size=3), rows=st.integers(1, 3),
       tokens=st.sampled_from([1, 4, 16, 64]), rule_value=_rule_and_value(), seed=st.integers(0, 2**31 - 1))
def test_lag_session_masks_have_the_calls_shape_and_uncond_rows_copy_their_sample(chunks, rows, tokens, rule_value,
                                                                                   seed):
    session = LagSession([1, 2], 6, *rule_value)
    session.begin_call(CallLayout(chunks))
    g = torch.Generator().manual_seed(seed)
    batch = rows * len(chunks)
    q, k = torch.randn(batch, tokens, 8, generator=g), torch.randn(batch, 6, 8, generator=g)
    session.record_q(("input", 1), q)
    session.record_k(("input", 1), k, heads=2)
    mask = session.mask(("input", 1), batch, (1, tokens), q.device)
    assert mask.shape == (batch, tokens) and (mask >= 0).all() and (mask <= 1).all()
    if 0 not in chunks:
        assert (mask == 0).all(), "no conditional rows seen yet: the base model"
        return
    first_cond = mask[chunks.index(0) * rows:(chunks.index(0) + 1) * rows]
    for i, c in enumerate(chunks):
        if c == 1:
            assert torch.equal(mask[i * rows:(i + 1) * rows], first_cond)
