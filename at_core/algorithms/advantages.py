"""Advantage estimators: rewards of a scored batch -> one advantage per response (or per token).

An estimator is `fn(rewards, groups, lengths, algo) -> list` registered with
`@register_advantage("name")`: `rewards[i]` is response i's shaped reward, `groups[i]`
its prompt's id, `lengths[i]` its token count, `algo` the `algorithm` config section. An
entry of the result is a float (the same advantage for every token) or a list of
`lengths[i]` floats (a token-level estimator).

A group of one response has no baseline. `algorithm.group_of_one` says what it gets:
`zero` (no signal; ours) or `reward` (the reward over 1 + eps, which is what the reference
GRPO code computes with its mean 0 / std 1 fallback).
"""
from __future__ import annotations

from collections import defaultdict
from statistics import fmean, stdev
from typing import Any, Callable, Dict, List, Sequence, Union

Advantage = Union[float, List[float]]
ADVANTAGES: Dict[str, Callable[..., List[Advantage]]] = {}
EPS = 1e-6


def register_advantage(name: str) -> Callable:
    def decorate(fn: Callable) -> Callable:
        ADVANTAGES[name] = fn
        return fn

    return decorate


def estimate_advantages(algo: Any, rewards: Sequence[float], groups: Sequence[int],
                        lengths: Sequence[int]) -> List[Advantage]:
    """The configured estimator (`algo.advantage`) on one scored batch."""
    if algo.advantage not in ADVANTAGES:
        raise ValueError(f"algorithm.advantage must be one of {', '.join(sorted(ADVANTAGES))}, got {algo.advantage!r}")
    out = ADVANTAGES[algo.advantage](list(map(float, rewards)), list(groups), list(lengths), algo)
    if len(out) != len(rewards):
        raise RuntimeError(f"advantage {algo.advantage!r} returned {len(out)} values for {len(rewards)} responses")
    return out


def _members(groups: Sequence[int]) -> Dict[int, List[int]]:
    members: Dict[int, List[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return members


def _lone(reward: float, algo: Any) -> float:
    if algo.group_of_one == "reward":
        return reward / (1.0 + EPS)
    return 0.0


def _per_group(rewards: List[float], groups: Sequence[int], algo: Any,
               centre: Callable[[List[float]], List[float]]) -> List[float]:
    out = [0.0] * len(rewards)
    for idx in _members(groups).values():
        if len(idx) == 1:
            out[idx[0]] = _lone(rewards[idx[0]], algo)
            continue
        for i, a in zip(idx, centre([rewards[i] for i in idx])):
            out[i] = a
    return out


@register_advantage("grpo")
def grpo(rewards, groups, lengths, algo) -> List[float]:
    """(r - group mean) / (unbiased group std + eps): each prompt is its own baseline and scale."""
    def centre(vals):
        mean, std = fmean(vals), stdev(vals)
        return [(v - mean) / (std + EPS) for v in vals]

    return _per_group(rewards, groups, algo, centre)


@register_advantage("dr_grpo")
def dr_grpo(rewards, groups, lengths, algo) -> List[float]:
    """r - group mean (Dr.GRPO): no std division, so prompts whose rewards barely differ are
    not blown up into full-size updates."""
    return _per_group(rewards, groups, algo, lambda vals: [v - fmean(vals) for v in vals])


@register_advantage("rloo")
def rloo(rewards, groups, lengths, algo) -> List[float]:
    """r_i - mean of the group's other rewards (leave-one-out): an unbiased baseline."""
    def centre(vals):
        total, k = sum(vals), len(vals)
        return [v - (total - v) / (k - 1) for v in vals]

    return _per_group(rewards, groups, algo, centre)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards, groups, lengths, algo) -> List[float]:
    """REINFORCE++ with a group baseline: r - group mean, then whitened over every response
    token of the batch (one scale for all prompts instead of one per prompt, which keeps
    near-unanimous groups from getting full-size updates)."""
    centred = _per_group(rewards, groups, algo, lambda vals: [v - fmean(vals) for v in vals])
    weights = [max(int(n), 1) for n in lengths]
    total = sum(weights)
    mean = sum(w * a for w, a in zip(weights, centred)) / total
    var = sum(w * (a - mean) ** 2 for w, a in zip(weights, centred)) / max(total - 1, 1)
    return [(a - mean) / (var ** 0.5 + EPS) for a in centred]
