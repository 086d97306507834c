"""A worked example of a reward for a new domain: multiple-choice questions.

The grader is a plain function `(response, gold) -> Grade`; registering it is all it
takes: `build_reward` runs it in the grading worker pool (bounded, crash-proof) and the
AutoThink machinery (think / no-think detection, base table, degeneration penalty,
batch balance, length shaping) applies unchanged. Select it with

    reward.name=mcq reward.module=examples.mcq_reward     (or reward.module=examples/mcq_reward.py)

Gold answers are letters ("B") or lists of acceptable letters (["B", "D"]).
"""
from __future__ import annotations

import re

from at_reward.grade import Grade
from at_reward.math import THINK_END, extract_boxed
from at_reward.registry import register_reward

CHOICES = "ABCDEFGH"
# "\boxed{B}", "\boxed{(B)}", "\boxed{\text{B}}", or the last "Answer: B" line.
_LETTER = re.compile(rf"^\(?\s*(?:\\text\{{\s*)?\(?([{CHOICES}])\)?\s*\}}?\s*\)?\.?$")
_ANSWER_LINE = re.compile(rf"(?im)^\s*(?:final\s+)?answer\s*[:：]\s*\(?([{CHOICES}])\)?\b")


def _letter(final: str) -> str | None:
    boxed = extract_boxed(final)
    if boxed is not None:
        m = _LETTER.match(boxed.strip())
        return m.group(1) if m else None
    lines = _ANSWER_LINE.findall(final)
    return lines[-1].upper() if lines else None


@register_reward("mcq")
def grade_mcq(response: str, gold) -> Grade:
    """Correct when the chosen letter is the gold letter (or one of them)."""
    cut = response.rfind(THINK_END)
    if cut < 0:
        return Grade(correct=False, format_ok=False, answer=None)
    letter = _letter(response[cut + len(THINK_END):])
    if letter is None:
        return Grade(correct=False, format_ok=False, answer=None)
    golds = {str(g).strip().strip("()").upper() for g in (gold if isinstance(gold, list) else [gold])}
    return Grade(correct=letter in golds, format_ok=True, answer=letter)
