"""AutoThink reward shaping (docs/method.md, "Rewards"), as the reference code computes it.

The per-response part: `detect_mode`, `base_reward`, `degeneration_penalty`. The batch
part, `shape_rewards`: `length_shaping` inside each prompt's group, then `batch_balance`
over the whole batch (the reference code's order; stage 1 balance, stage 3 length).
"""
from __future__ import annotations

import math
from statistics import fmean, stdev
from typing import Optional, Sequence

NO_THINK_PREFIX = "</think>"
# Base reward by (think, correct); format errors score 0 in both modes.
BASE_REWARD = {(True, True): 1.0, (True, False): 0.0, (False, True): 2.0, (False, False): -1.0}
# batch_balance pulls the over-represented mode toward these, by (think, correct).
BALANCE_TARGET = {(True, True): 0.0, (True, False): -1.0, (False, True): 1.0, (False, False): -2.0}
DEGENERATE_REWARD = -2.0


def detect_mode(response: str) -> str:
    """"no_think" when the generated text starts with `</think>` (the model closed the
    ellipsis prompt's think block at once), else "think". No leading whitespace is allowed:
    our rule (`reward.rules=project`); the reference's reading is `at_reward.rules.ReferenceRules`."""
    return "no_think" if response.startswith(NO_THINK_PREFIX) else "think"


def base_reward(think: bool, correct: bool, format_ok: bool) -> float:
    """The naive table: think +1 / 0, no-think +2 / -1, format error 0."""
    if not format_ok:
        return 0.0
    return BASE_REWARD[(bool(think), bool(correct))]


def is_degenerate(text: str, *, max_ngram: int = 30, min_repeats: int = 10, max_word_len: int = 120) -> bool:
    """The reference code's degeneration test on whitespace-split words: a "word" of
    >= `max_word_len` characters, or, for some n in 1..`max_ngram`, >= `min_repeats`
    back-to-back equal n-grams among the non-overlapping n-word chunks taken from the start.
    """
    words = text.split()
    if any(len(w) >= max_word_len for w in words):
        return True
    for n in range(1, max_ngram + 1):
        chunks = len(words) // n
        if chunks < min_repeats:
            break
        run, prev = 1, words[0:n]
        for k in range(1, chunks):
            cur = words[k * n : (k + 1) * n]
            if cur == prev:
                run += 1
                if run >= min_repeats:
                    return True
            else:
                run = 1
            prev = cur
    return False


def degeneration_penalty(reward: float, response: str) -> float:
    """-2 for a degenerate text, applied only where the reward is already negative (a wrong
    no-think answer), as in the reference code; otherwise `reward` unchanged. The reward passes
    the text its rules read: the response alone, or prompt + response for the reference."""
    if reward < 0 and is_degenerate(response):
        return DEGENERATE_REWARD
    return reward


def think_rate(think: Sequence[bool]) -> float:
    """Fraction of think responses (z in docs/method.md); 0 for an empty batch."""
    return sum(map(bool, think)) / len(think) if len(think) else 0.0


def length_shaping(
    rewards: Sequence[float],
    correct: Sequence[bool],
    lengths: Sequence[float],
    groups: Sequence[int],
    alpha: float,
    beta: float,
) -> list[float]:
    """Stage 3: inside each group, separately over its correct and its wrong responses
    (only a subset with > 1 member), y = (L - mean) / max(unbiased std, 1e-6), then
    correct: r + exp(-alpha y) - 1 (shorter gains); wrong: r + 1 - exp(-beta y)."""
    out = [float(r) for r in rewards]
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault((g, bool(correct[i])), []).append(i)
    for (_, is_correct), idx in members.items():
        coef = alpha if is_correct else beta
        if len(idx) < 2 or coef == 0:
            continue
        lens = [float(lengths[i]) for i in idx]
        mean, std = fmean(lens), max(stdev(lens), 1e-6)
        for i, length in zip(idx, lens):
            y = (length - mean) / std
            out[i] += math.exp(-coef * y) - 1.0 if is_correct else 1.0 - math.exp(-coef * y)
    return out


def batch_balance(
    rewards: Sequence[float],
    think: Sequence[bool],
    correct: Sequence[bool],
    target: float,
    slope: float = 2.0,
) -> list[float]:
    """Stage 1: if a mode's share of the whole batch exceeds `target` (gamma), every
    response of that mode moves toward its target reward by a = clip(slope*(share-gamma),
    0, 1): r <- (1-a) r + a t; t = 0 / -1 (think correct / wrong), +1 / -2 (no-think)."""
    out = [float(r) for r in rewards]
    if not out:
        return out
    z = think_rate(think)
    for mode, share in ((True, z), (False, 1.0 - z)):
        if share > target:
            a = min(1.0, max(0.0, slope * (share - target)))
            for i, t in enumerate(think):
                if bool(t) == mode:
                    out[i] = (1.0 - a) * out[i] + a * BALANCE_TARGET[(mode, bool(correct[i]))]
    return out


def shape_rewards(
    base: Sequence[float],
    think: Sequence[bool],
    correct: Sequence[bool],
    lengths: Sequence[float],
    groups: Sequence[int],
    *,
    balance_target: Optional[float] = None,
    balance_slope: float = 2.0,
    length_alpha: float = 0.0,
    length_beta: float = 0.0,
) -> list[float]:
    """Batch-level shaping of base rewards: `length_shaping` per group, then
    `batch_balance` over the whole batch (off when `balance_target` is None or >= 1); the
    keyword form of `at_reward.shaping.Shaping(...).apply`.

    Format errors take part as the reference code has them: their base is 0, they count
    as wrong (correct=False) in length shaping, in their detected mode for the think rate,
    and move toward that mode's wrong target (-1 think, -2 no-think) under balance.
    """
    from at_reward.shaping import Shaping

    return Shaping(balance_target, balance_slope, length_alpha, length_beta).apply(base, think, correct, lengths,
                                                                                   groups)
