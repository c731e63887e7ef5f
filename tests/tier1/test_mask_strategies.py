"""Mask strategies (residual_core/masks.py): where each takes its map from, and when."""

import pytest
import torch
from helpers import tiny_unet
from personalized_residuals.residual_core import (
    MASK_STRATEGIES,
    CallLayout,
    Concept,
    LagSession,
    MaskStrategy,
    ResidualError,
    ResidualSet,
    attach,
    check_strategy,
    find_targets,
)
from personalized_residuals.residual_core.lag import threshold
from personalized_residuals.residual_core.masks import FREEFUSE_STEP, WARMUP, SchedulePosition, resize_map, without_sinks

GRID = (4, 4)


def to_mask(attn):
    return threshold(attn, "max_fraction", 0.5)


def maps(seed, rows=1, n=16):
    return torch.rand(rows, n, generator=torch.Generator().manual_seed(seed))


def test_every_offered_name_parses_and_bad_names_are_refused_by_name():
    for name in MASK_STRATEGIES:
        check_strategy(name)
        assert MaskStrategy(name).name == name
    for bad in ("", "per_blok", "shared+", "ema+shared", "shared+fixed", "+ema"):
        with pytest.raises(ResidualError, match="mask strategy"):
            check_strategy(bad)
    with pytest.raises(ResidualError, match="mask strategy"):
        LagSession([1], 6, strategy="nope")


def test_per_block_is_the_rule_on_the_blocks_own_map_and_nothing_before_it():
    s = MaskStrategy("per_block")
    a = maps(0)
    mask, score = s.mask(("input", 1), None, GRID, a, True, to_mask)
    assert torch.equal(mask, to_mask(a)) and torch.allclose(score, a / a.amax())
    assert s.mask(("input", 1), None, GRID, None, False, to_mask) is None  # the session keeps the last one


def test_warmup_gives_zero_masks_before_n_evaluations_then_the_rule():
    s = MaskStrategy("warmup")
    for step in range(WARMUP + 2):
        s.begin_evaluation()
        a = maps(step)
        mask, _ = s.mask(("input", 1), None, GRID, a, True, to_mask)
        if step < WARMUP:
            assert not mask.any(), f"evaluation {step} is in the warm-up"
        else:
            assert torch.equal(mask, to_mask(a))
    assert MaskStrategy("warmup5").warmup == 5 and MaskStrategy("shared+warmup1").warmup == 1
    with pytest.raises(ResidualError, match="mask strategy"):
        check_strategy("ema5")
    s.reset()  # a new run warms up again
    s.begin_evaluation()
    assert not s.mask(("input", 1), None, GRID, maps(9), True, to_mask)[0].any()



@pytest.mark.parametrize(("steps", "warm"), [(25, 3), (4, 0), (50, 6), (2, 0), (10, 1)])
def test_warmup_is_a_share_of_the_schedule_when_the_caller_gives_the_step(steps, warm):
    s = MaskStrategy("warmup")
    zero = []
    for step in range(steps):
        s.begin_evaluation(SchedulePosition(step, steps))
        zero.append(not s.mask(("input", 1), None, GRID, maps(step), True, to_mask)[0].any())
    assert zero == [True] * warm + [False] * (steps - warm)

def test_freefuse_masks_are_zero_before_step_k_then_fixed_from_the_chosen_block():
    block, other = ("output", 0), ("input", 1)
    s = MaskStrategy("freefuse")
    seen = []
    for step in range(FREEFUSE_STEP + 3):
        s.begin_evaluation()
        before = s.mask(other, None, GRID, maps(10 + step), True, to_mask)  # runs before the chosen block
        at = s.mask(block, None, GRID, maps(step), True, to_mask)
        if step < FREEFUSE_STEP:
            assert not before[0].any() and not at[0].any(), "no residual before the masks are fixed"
        else:
            seen.append((before[0], at[0]))
    captured = maps(FREEFUSE_STEP)
    expected = to_mask(without_sinks(captured, GRID) / without_sinks(captured, GRID).amax())
    assert not seen[0][0].any(), "blocks before the chosen one get nothing in the capture step"
    assert torch.equal(seen[0][1], expected)
    for before, at in seen[1:]:  # held fixed, whatever the attention does later, in every block
        assert torch.equal(at, expected) and torch.equal(before, expected)
    # A coarser block gets the same mask resized.
    coarse, _ = s.mask(("middle", 0), None, (2, 2), maps(99, n=4), True, to_mask)
    assert coarse.shape == (1, 4) and coarse.any()


def test_freefuse_restart_applies_the_fixed_masks_from_the_first_step_of_the_next_run():
    s = MaskStrategy("freefuse")
    for step in range(FREEFUSE_STEP + 1):
        s.begin_evaluation()
        s.mask(("output", 0), None, GRID, maps(step), True, to_mask)
    fixed = s.fixed[None][0].clone()
    s.restart()
    s.reset()
    s.begin_evaluation()
    mask, score = s.mask(("input", 1), None, GRID, maps(50), True, to_mask)
    assert torch.equal(score, fixed) and mask.any()
    s.reset()  # without restart() a new run forgets them
    assert not s.fixed


def test_sinks_are_capped_on_the_border_and_at_the_top_k():
    attn = torch.full((1, 64), 0.1)
    attn[0, 0] = 50.0  # a corner sink
    attn[0, 27] = 1.0  # the object, inside
    filtered = without_sinks(attn, (8, 8))
    assert filtered[0, 0] <= filtered[0, 27] and filtered.amax() < 50


def test_lorashop_masks_come_from_the_named_block_in_every_block():
    named = ("output", 1)
    s = MaskStrategy("lorashop", block=named)
    s.begin_evaluation()
    first = s.mask(("input", 1), None, GRID, maps(1), True, to_mask)
    assert not first[0].any(), "nothing before the named block has run"
    y = maps(2)
    s.mask(named, None, GRID, y, True, to_mask)
    after = s.mask(("output", 3), None, GRID, maps(3), True, to_mask)  # later in the same call: this call's
    assert torch.equal(after[0], to_mask(y / y.amax()))
    s.begin_evaluation()
    early = s.mask(("input", 1), None, GRID, maps(4), True, to_mask)  # next step, before it: the previous one's
    assert torch.equal(early[0], to_mask(y / y.amax()))
    coarse = s.mask(("middle", 0), None, (2, 2), maps(5, n=4), True, to_mask)
    assert torch.equal(coarse[1], resize_map(y / y.amax(), GRID, (2, 2)) / resize_map(y / y.amax(), GRID, (2, 2)).amax())


def test_lorashop_default_is_the_last_block_to_run():
    s = MaskStrategy("lorashop")
    blocks = [("input", 1), ("middle", 0), ("output", 3)]
    for step in range(2):
        s.begin_evaluation()
        for i, b in enumerate(blocks):
            s.mask(b, None, GRID, maps(10 * step + i), True, to_mask)
    assert s.chosen == ("output", 3)
    s.begin_evaluation()
    last = maps(12)
    assert torch.equal(s.mask(("input", 1), None, GRID, maps(77), True, to_mask)[1], last / last.amax())


def test_shared_is_one_mask_for_all_blocks_from_the_previous_evaluation():
    s = MaskStrategy("shared")
    s.begin_evaluation()
    a, b = maps(1), maps(2)
    s.mask(("input", 1), None, GRID, a, True, to_mask)
    s.mask(("output", 3), None, GRID, b, True, to_mask)
    s.begin_evaluation()
    mean = (a / a.amax() + b / b.amax()) / 2
    one = s.mask(("input", 1), None, GRID, maps(3), True, to_mask)
    two = s.mask(("output", 3), None, GRID, maps(4), True, to_mask)
    assert torch.equal(one[0], to_mask(mean)) and torch.equal(two[0], one[0]), "the same mask in every block"


def test_ema_smooths_the_score_over_evaluations():
    s = MaskStrategy("ema")
    s.begin_evaluation()
    a, b = maps(1), maps(2)
    s.mask(("input", 1), None, GRID, a, True, to_mask)
    s.begin_evaluation()
    _, score = s.mask(("input", 1), None, GRID, b, True, to_mask)
    smooth = 0.5 * a / a.amax() + 0.5 * b / b.amax()
    assert torch.allclose(score, smooth / smooth.amax())


@pytest.mark.parametrize("strategy", ["freefuse", "lorashop", "shared"])
def test_two_concepts_masks_never_overlap_and_freefuse_stays_fixed(strategy):
    unet = tiny_unet(False, depth=1)
    targets = find_targets(unet)
    a = ResidualSet.for_targets(targets, 0.5, init="random", seed=2)
    b = ResidualSet.for_targets(targets, 0.5, init="random", seed=3)
    sessions = [LagSession([2], 6, "max_fraction", 0.3, strategy=strategy),
                LagSession([4], 6, "max_fraction", 0.3, strategy=strategy)]
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 16)
    applied = []
    for step in range(FREEFUSE_STEP + 3):
        for s in sessions:
            s.begin_evaluation()
        with attach(unet, [Concept(a, 1.0, sessions[0]), Concept(b, 1.0, sessions[1])], call=CallLayout([1, 0])):
            unet(x + 0.3 * step, torch.tensor([900 - 100 * step] * 2), ctx)  # the attention changes every step
        applied.append({key: [s.last[key][0].clone() for s in sessions] for key in sessions[0].last})
    for per_step in applied:
        for ma, mb in per_step.values():
            assert not (ma * mb).any(), "two concepts' masks overlap"
    assert any(m.any() for per_step in applied[FREEFUSE_STEP + 1:] for ms in per_step.values() for m in ms)
    if strategy == "freefuse":
        for per_step in applied[:FREEFUSE_STEP]:
            assert not any(m.any() for ms in per_step.values() for m in ms)
        for later in applied[FREEFUSE_STEP + 1:]:
            for key, ms in later.items():
                assert all(torch.equal(m, f) for m, f in zip(ms, applied[FREEFUSE_STEP + 1][key], strict=True))


def test_the_pairs_report_replaces_only_its_own_section(tmp_path):
    from personalized_residuals.bench.pairs import BASE, GLOBAL, goals_table, write_section

    report = tmp_path / "report.md"
    report.write_text("# Results\n\nkept\n\n## Two concepts in one image\n\nold table\n\n## Later\n\nalso kept\n")
    write_section(report, "## Two concepts in one image\n\nnew table\n")
    text = report.read_text()
    assert "old table" not in text and "new table" in text and "kept" in text and "## Later\n\nalso kept" in text
    rows = [{"variant": v, "seed": s, "identity_a": a, "identity_b": 0.2, "bleeding": b, "both_present": p}
            for s in (0, 1) for v, a, b, p in ((BASE, 0.1, 0.10, 0.5), (GLOBAL, 0.3, 0.4, 0.4), ("LAG x", 0.3, 0.12, 0.6))]
    line = goals_table(rows).splitlines()[-1]
    assert line.startswith("| LAG x | +0.020 | +0.100 | +0.000 | +0.000 | 4 of 4")
