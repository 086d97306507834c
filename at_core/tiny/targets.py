"""What a tiny AutoThink run should show, as checks on its results rows.

Two groups. The headline (`HEADLINE`): stage 3 keeps the standard prompt's accuracy (within
a point) at half its tokens or fewer, thinking on hard problems and not on easy ones. The
stage shape (`SHAPE`), the paper's: stage 1 keeps both modes alive on every tier while hard
problems already think more; stage 2 raises accuracy without giving up hard thinking; stage 3
cuts tokens at stage 2's accuracy. All are read on the held-out evaluation rows, never on
training batches. `examples/tiny_r1.py` prints them after every run and `examples/tiny_sweep.py`
over seeds and thread counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping

Rows = Mapping[str, Mapping]


@dataclass(frozen=True)
class Target:
    name: str
    rule: str  # the target, in words
    value: Callable[[Rows], float]  # the measured quantity
    met: Callable[[float], bool]


def _think(r: Rows, row: str, tier: str) -> float:
    return r[row]["tiers"][tier]["think_rate"]


def _acc(r: Rows, row: str) -> float:
    return r[row]["accuracy"]


def _tok(r: Rows, row: str) -> float:
    return r[row]["mean_tokens"]


HEADLINE = [
    Target("accuracy", "stage3 accuracy - base/standard accuracy >= -1 point",
           lambda r: 100 * (_acc(r, "stage3") - _acc(r, "base/standard")), lambda v: v >= -1.0),
    Target("tokens", "stage3 tokens / base/standard tokens <= 0.5",
           lambda r: _tok(r, "stage3") / _tok(r, "base/standard"), lambda v: v <= 0.5),
    Target("think_by_difficulty", "stage3 think rate hard - easy >= 0.6",
           lambda r: _think(r, "stage3", "hard") - _think(r, "stage3", "easy"), lambda v: v >= 0.6),
]

SHAPE = [
    *[Target(f"stage1_alive_{t}", f"stage1 think rate on {t} in [0.2, 0.8]",
             lambda r, t=t: _think(r, "stage1", t), lambda v: 0.2 <= v <= 0.8) for t in ("easy", "medium", "hard")],
    Target("stage1_hard_over_easy", "stage1 think rate hard - easy >= 0.2",
           lambda r: _think(r, "stage1", "hard") - _think(r, "stage1", "easy"), lambda v: v >= 0.2),
    Target("stage2_accuracy_up", "stage2 accuracy - stage1 accuracy > 0",
           lambda r: 100 * (_acc(r, "stage2") - _acc(r, "stage1")), lambda v: v > 0),
    Target("stage2_hard_thinks", "stage2 think rate on hard >= 0.7",
           lambda r: _think(r, "stage2", "hard"), lambda v: v >= 0.7),
    Target("stage3_tokens_down", "stage3 tokens - stage2 tokens < 0",
           lambda r: _tok(r, "stage3") - _tok(r, "stage2"), lambda v: v < 0),
    Target("stage3_accuracy_kept", "stage3 accuracy - stage2 accuracy >= -1 point",
           lambda r: 100 * (_acc(r, "stage3") - _acc(r, "stage2")), lambda v: v >= -1.0),
]


def check(rows: List[Mapping]) -> List[Dict]:
    """One record per target: name, rule, measured value, met. Rows are results.json's; a
    target whose rows the run does not have (e.g. `start_stage=2`: no stage1 row) gets
    value and met None."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for group, targets in (("headline", HEADLINE), ("shape", SHAPE)):
        for t in targets:
            try:
                value = t.value(by_name)
            except KeyError:
                out.append({"group": group, "name": t.name, "rule": t.rule, "value": None, "met": None})
                continue
            out.append({"group": group, "name": t.name, "rule": t.rule, "value": round(value, 4),
                        "met": bool(t.met(value))})
    return out


def _value(c: Dict, fmt: str) -> str:
    return "n/a" if c["value"] is None else f"{c['value']:{fmt}}"


def cell(c: Dict, fmt: str = "+.3f") -> str:
    """A target's measured value, marked where missed; "n/a" where the run lacks its rows."""
    return _value(c, fmt) + (" **no**" if c["met"] is False else "")


def markdown(checks: List[Dict]) -> str:
    verdict = {True: "yes", False: "**no**", None: "n/a"}
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {c['rule']} | {_value(c, '+.3f')} | {verdict[c['met']]} |" for c in checks]
    return "\n".join(lines) + "\n"
