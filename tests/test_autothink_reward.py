"""AutoThink reward shaping against values computed by hand (docs/method.md, "Rewards").

Expected numbers are written out as arithmetic on the formulas, never produced by the
functions under test. Notation: a = clip(slope * (share - gamma), 0, 1), interpolation
r <- (1 - a) r + a t; stage 3: y = (L - mean) / std (unbiased), correct: r + exp(-0.05 y) - 1,
wrong: r + 1 - exp(-0.05 y).
"""
from __future__ import annotations

import math

import pytest

from at_reward.autothink import (
    base_reward,
    batch_balance,
    degeneration_penalty,
    detect_mode,
    is_degenerate,
    length_shaping,
    shape_rewards,
    think_rate,
)

STAGE1 = dict(balance_target=0.5, balance_slope=2.0)
STAGE2 = dict(balance_target=1.0)
STAGE3 = dict(length_alpha=0.05, length_beta=0.05)
E = math.exp


def approx(values):
    return pytest.approx(values, abs=1e-9)


# ----------------------------------------------------------------------------- per response


def test_detect_mode():
    assert detect_mode("</think>\n\nThe answer is \\boxed{4}.") == "no_think"
    assert detect_mode("</think>4") == "no_think"
    assert detect_mode("Okay, let me think.\n</think>\n\n\\boxed{4}") == "think"
    assert detect_mode(" </think>\n\n4") == "think"  # no leading whitespace (our rule)
    assert detect_mode("\n</think>") == "think"
    assert detect_mode("") == "think"


def test_base_reward_table():
    assert base_reward(think=True, correct=True, format_ok=True) == 1.0
    assert base_reward(think=True, correct=False, format_ok=True) == 0.0
    assert base_reward(think=False, correct=True, format_ok=True) == 2.0
    assert base_reward(think=False, correct=False, format_ok=True) == -1.0
    assert base_reward(think=True, correct=False, format_ok=False) == 0.0
    assert base_reward(think=False, correct=False, format_ok=False) == 0.0


def test_degeneration_detection():
    assert is_degenerate("the answer " + "so " * 10)  # a 1-gram repeated 10 times
    assert not is_degenerate("the answer " + "so " * 9 + "done")
    assert is_degenerate("ab " + "x" * 120)  # a 120-character word
    assert not is_degenerate("ab " + "x" * 119)
    # n-grams are non-overlapping chunks counted from the first word (the reference's
    # scheme): "p" then 10 x "a b" puts (b, a) in chunks 1..9 only: 9 repeats, not flagged...
    assert not is_degenerate("p " + "a b " * 10)
    # ...one more "a b" gives (b, a) ten times back to back.
    assert is_degenerate("p " + "a b " * 11)
    assert is_degenerate(" ".join(["wait let me recompute this carefully"] * 10))  # a 6-gram
    assert not is_degenerate("")


def test_degeneration_penalty_only_where_negative():
    junk = "so " * 50
    assert degeneration_penalty(-1.0, junk) == -2.0
    assert degeneration_penalty(-1.0, "a fine wrong answer") == -1.0
    assert degeneration_penalty(0.0, junk) == 0.0  # think-wrong and format errors are not < 0
    assert degeneration_penalty(2.0, junk) == 2.0


# ----------------------------------------------------------------------------- stage 1: balance

# Two prompts x 4 rollouts. Modes: 6 think, 2 no-think -> z = 6/8 = 0.75.
THINK = [True, True, True, False, True, True, False, True]
CORRECT = [True, True, False, True, False, False, False, True]
FORMAT_OK = [True, True, True, True, True, False, True, True]  # row 5: think format error
BASE = [1.0, 1.0, 0.0, 2.0, 0.0, 0.0, -1.0, 1.0]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1]
LENGTHS = [100, 200, 300, 50, 400, 500, 60, 250]


def test_stage1_think_heavy_batch():
    # z = 0.75 > 0.5: a = 2 * (0.75 - 0.5) = 0.5 for think; no-think share 0.25 < 0.5: unchanged.
    # think correct: 0.5*1 + 0.5*0 = 0.5; think wrong: 0.5*0 + 0.5*(-1) = -0.5;
    # the think format error counts as wrong: 0.5*0 + 0.5*(-1) = -0.5.
    expected = [0.5, 0.5, -0.5, 2.0, -0.5, -0.5, -1.0, 0.5]
    assert shape_rewards(BASE, THINK, CORRECT, LENGTHS, GROUPS, **STAGE1) == approx(expected)


def test_stage1_no_think_heavy_batch():
    # 1 think of 5: no-think share 0.8 > 0.5, a = 2 * 0.3 = 0.6 (think share 0.2: unchanged).
    think = [False, False, False, False, True]
    correct = [True, False, False, False, True]
    base = [2.0, -1.0, -2.0, 0.0, 1.0]  # correct, wrong, degenerate wrong, format error, think
    expected = [
        0.4 * 2.0 + 0.6 * 1.0,  # 1.4
        0.4 * -1.0 + 0.6 * -2.0,  # -1.6
        0.4 * -2.0 + 0.6 * -2.0,  # -2.0
        0.4 * 0.0 + 0.6 * -2.0,  # -1.2: a no-think format error is pulled to the wrong target
        1.0,
    ]
    assert shape_rewards(base, think, correct, [1] * 5, [0] * 5, **STAGE1) == approx(expected)


def test_stage1_all_think_and_all_no_think():
    # All think: z = 1, a = clip(2 * 0.5) = 1: every reward becomes its target (0 / -1).
    assert shape_rewards([1.0, 0.0, 0.0], [True] * 3, [True, False, False], [1, 2, 3], [0, 0, 0], **STAGE1) == approx(
        [0.0, -1.0, -1.0]
    )
    # All no-think: a = 1: targets +1 / -2.
    assert shape_rewards([2.0, -1.0], [False] * 2, [True, False], [1, 2], [0, 0], **STAGE1) == approx([1.0, -2.0])


def test_stage1_balanced_batch_and_slope():
    base, think, correct = [1.0, 2.0, 0.0, -1.0], [True, False, True, False], [True, True, False, False]
    # z = 0.5 exactly: neither share exceeds gamma.
    assert shape_rewards(base, think, correct, [1] * 4, [0] * 4, **STAGE1) == approx(base)
    # 3 of 5 think, z = 0.6: a = 2 * 0.1 = 0.2; think correct 0.8*1 + 0.2*0 = 0.8; wrong 0.8*0 - 0.2 = -0.2.
    out = shape_rewards([1.0, 0.0, 1.0, 2.0, -1.0], [True, True, True, False, False],
                        [True, False, True, True, False], [1] * 5, [0] * 5, **STAGE1)  # fmt: skip
    assert out == approx([0.8, -0.2, 0.8, 2.0, -1.0])
    # A gentler slope: lambda = 1, z = 0.75: a = 0.25; think correct 0.75*1 = 0.75.
    out = batch_balance([1.0, 1.0, 1.0, 2.0], [True, True, True, False], [True] * 4, target=0.5, slope=1.0)
    assert out == approx([0.75, 0.75, 0.75, 2.0])


def test_balance_off():
    for off in (dict(balance_target=None), dict(balance_target=1.0), dict(balance_target=1.5)):
        assert shape_rewards(BASE, THINK, CORRECT, LENGTHS, GROUPS, **off) == BASE


# ----------------------------------------------------------------------------- stage 2


def test_stage2_is_the_base_reward():
    assert shape_rewards(BASE, THINK, CORRECT, LENGTHS, GROUPS, **STAGE2) == BASE
    assert shape_rewards([], [], [], [], [], **STAGE1) == []


# ----------------------------------------------------------------------------- stage 3: length


def test_stage3_length_shaping_mixed_groups():
    # Group 0: correct lengths 100, 200, 50 (rows 0, 1, 3; row 3 is no-think: modes mix).
    #   mean = 350/3; deviations -50/3, 250/3, -200/3; unbiased var = (2500 + 62500 + 40000)/9/2
    #   = 105000/18, std = sqrt(105000/18) = 76.3763; y = dev/std.
    s0 = math.sqrt(105000 / 18)
    y0 = [(-50 / 3) / s0, (250 / 3) / s0, (-200 / 3) / s0]
    # Group 0 wrong: row 2 alone -> unchanged.
    # Group 1: correct row 7 alone -> unchanged; wrong rows 4, 5, 6 (row 5 a format error),
    #   lengths 400, 500, 60: mean 320, deviations 80, 180, -260; var = (6400+32400+67600)/2 = 53200.
    s1 = math.sqrt(53200)
    y1 = [80 / s1, 180 / s1, -260 / s1]
    expected = [
        1.0 + E(-0.05 * y0[0]) - 1,
        1.0 + E(-0.05 * y0[1]) - 1,
        0.0,
        2.0 + E(-0.05 * y0[2]) - 1,
        0.0 + 1 - E(-0.05 * y1[0]),
        0.0 + 1 - E(-0.05 * y1[1]),
        -1.0 + 1 - E(-0.05 * y1[2]),
        1.0,
    ]
    assert shape_rewards(BASE, THINK, CORRECT, LENGTHS, GROUPS, **STAGE3) == approx(expected)
    # Spot values: y = 250/3 / 76.3763 = 1.0911 -> 1 + exp(-0.054554) - 1 = 0.946907.
    assert expected[1] == pytest.approx(0.946907, abs=1e-6)


def test_stage3_simple_numbers():
    # Correct lengths 100, 200, 300: mean 200, std = sqrt((100^2 + 0 + 100^2) / 2) = 100, y = -1, 0, 1.
    # Wrong lengths 50, 150: mean 100, std = sqrt(2 * 50^2 / 1) = 70.7107, y = -1/sqrt2, +1/sqrt2.
    base = [1.0, 1.0, 1.0, -1.0, -1.0]
    correct = [True, True, True, False, False]
    think = [True, True, True, False, False]
    r = 1 / math.sqrt(2)
    expected = [
        1 + (E(0.05) - 1),  # 1.051271
        1 + 0.0,
        1 + (E(-0.05) - 1),  # 0.951229
        -1 + (1 - E(0.05 * r)),  # -1.035988: the shorter wrong answer loses
        -1 + (1 - E(-0.05 * r)),  # -0.965262: the longer wrong answer keeps more
    ]
    out = shape_rewards(base, think, correct, [100, 200, 300, 50, 150], [4] * 5, **STAGE3)
    assert out == approx(expected)
    assert out[0] == pytest.approx(1.051271, abs=1e-6) and out[3] == pytest.approx(-1.035988, abs=1e-6)


def test_stage3_edge_cases():
    # Singleton subsets (one correct, one wrong per group) are left alone.
    base = [1.0, 0.0, 2.0, -1.0]
    assert shape_rewards(base, [True, True, False, False], [True, False, True, False],
                         [10, 5000, 20, 9000], [0, 0, 1, 1], **STAGE3) == base  # fmt: skip
    # Equal lengths: std 0 floored at 1e-6, y = 0, exp(0) - 1 = 0: unchanged.
    assert shape_rewards([1.0, 1.0, 0.0, 0.0], [True] * 4, [True, True, False, False],
                         [300, 300, 700, 700], [0] * 4, **STAGE3) == [1.0, 1.0, 0.0, 0.0]  # fmt: skip
    # Lengths differing by 1 over a near-zero std are fine: y = +-1/sqrt2 (std = sqrt(0.5)).
    out = length_shaping([1.0, 1.0], [True, True], [7, 8], [0, 0], alpha=0.05, beta=0.05)
    assert out == approx([1 + E(0.05 / math.sqrt(2)) - 1, 1 + E(-0.05 / math.sqrt(2)) - 1])
    # Groups are matched by id, not position: interleaved ids 7, 3, 7, 3.
    out = length_shaping([1.0, 1.0, 1.0, 1.0], [True] * 4, [100, 10, 300, 30], [7, 3, 7, 3], alpha=0.05, beta=0.05)
    # Group 7 (rows 0, 2): 100, 300 -> mean 200, std sqrt(2*100^2) = 141.42, y = -0.7071, +0.7071;
    # group 3 (rows 1, 3): 10, 30 -> mean 20, std 14.142, the same y. c = 0.05 / sqrt2.
    c = 0.05 / math.sqrt(2)
    assert out == approx([E(c), E(c), E(-c), E(-c)])


def test_length_then_balance_order():
    # The reference applies length shaping first, then balance as an interpolation.
    # 3 think of 4 -> a = 0.5. Group 0, think correct lengths 100, 300: y = -+1/sqrt2, so
    # after length: 1 + exp(+-0.05/sqrt2) - 1; after balance: 0.5 * that + 0.5 * 0.
    r = 1 / math.sqrt(2)
    out = shape_rewards([1.0, 1.0, 0.0, 2.0], [True, True, True, False], [True, True, False, True],
                        [100, 300, 50, 80], [0, 0, 1, 1], balance_target=0.5, **STAGE3)  # fmt: skip
    assert out == approx([0.5 * E(0.05 * r), 0.5 * E(-0.05 * r), 0.5 * 0.0 + 0.5 * -1.0, 2.0])


def test_think_rate_and_length_mismatch():
    assert think_rate([True, False, True, True]) == 0.75
    assert think_rate([]) == 0.0
    with pytest.raises(ValueError, match="lengths"):
        shape_rewards([1.0, 0.0], [True, True], [True, False], [1], [0, 0])
