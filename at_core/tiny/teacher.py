"""The teacher: correct R1-style responses for tiny-task problems, in both modes.

Think mode (the text after the prompt's `<think>\\n`): `TRACE\\n</think>\\n\\n\\boxed{N}`.
No-think mode (after the ellipsis prompt `<think>\\n...\\n`): `</think>\\n\\n\\boxed{N}`.
Forced no-think (after `...\\n</think>\\n\\n`): `\\boxed{N}`. The end-of-sequence token
is the tokenizer's business and is appended by whoever tokenises.

Every step a trace writes is something a tiny model can compute from a few tokens it can
see: copying an operand, a single-digit fact (`7*6=42`), adding a one-digit carry to a
two-digit number (`24+4=28`), the next number when counting, a digit taken from an
earlier line. A hard product is long multiplication,
units digit first:

    7*6=42          units: write 2, carry 4
    4*6=24          tens
    24+4=28         plus the carry: write 8, carry 2
    3*6=18          hundreds
    18+2=20         plus the carry: the leading digits
    So 347*6=2082.  the leading digits, then the digits written above

Easy and medium problems get traces of a similar length, because R1-style models
overthink easy problems too: a preamble, the fact, and a double-check (counting up for
addition and subtraction, repeated addition for the multiplication table). That makes a
think response several times longer than a no-think one on every tier, which is what
lets AutoThink save tokens by skipping thought on easy problems.

Half the hard traces (picked by the problem text, so unpredictable from the problem) end
with a redundant re-check of the conclusion, as R1's "Wait, let me double-check" does: the
answer does not need it, so after SFT the model writes it about half the time, the plain
reward (stage 2) is indifferent to it, and length shaping (stage 3) is what prunes it.
"""
from __future__ import annotations

import zlib

from at_core.data import Problem
from at_core.tiny.task import Arithmetic, parse

NO_THINK_PREFIX = "</think>\n\n"
THINK_CLOSE = "\n</think>\n\n"

# A think response starts with one word per tier ("Okay" easy, "Right" medium, "Hmm" hard):
# after the ellipsis prompt the mode is one choice between two tokens, `</think>` and the
# tier's opener, which sampling temperature leaves balanced (several openers per tier would
# split think's half, and T=0.6 would sharpen the choice toward `</think>`). Because the
# opener depends on the problem, as an R1 trace's first words do, the model has to know the
# tier where it chooses the mode, which is what RL needs to tie the choice to difficulty.
_OPENERS = {"easy": "Okay", "medium": "Right", "hard": "Hmm"}
_OPENINGS = ("so I need to", "I need to", "I have to")
_CAREFUL = ("This looks simple, but let me be careful.", "Let me work it out carefully.")
RECHECK = "Wait, let me check that once more: {claim}. Yes."


def _variant(text: str, options: tuple[str, ...], salt: str) -> str:
    """A wording picked by the problem text: the teacher stays a function of the problem."""
    return options[zlib.crc32(f"{salt}:{text}".encode()) % len(options)]


def _operands(arith: Arithmetic) -> tuple[int, int]:
    """The order the trace works in: as asked, except a long multiplication puts the
    multi-digit number first."""
    if arith.tier == "hard":
        return max(arith.a, arith.b), min(arith.a, arith.b)
    return arith.a, arith.b


def _task(arith: Arithmetic) -> str:
    a, b = _operands(arith)
    return f"add {a} and {b}" if arith.op == "+" else f"multiply {a} by {b}"


def _count_up(start: int, stop: int) -> str:
    return ", ".join(str(k) for k in range(start + 1, stop + 1))


def _easy_steps(arith: Arithmetic) -> list[str]:
    a, b, v = arith.a, arith.b, arith.value
    return [f"{a}+{b}={v}", f"Let me double-check by counting up from {a}: {_count_up(a, v)}.",
            f"And the other way: {b}+{a}={v}."]


def _medium_steps(arith: Arithmetic) -> list[str]:
    a, b, v = arith.a, arith.b, arith.value
    small, big = min(a, b), max(a, b)
    sums = [f"{big * k}+{big}={big * (k + 1)}" for k in range(1, small)]
    return [f"{a}*{b}={v}", f"Let me double-check by adding {small} copies of {big}: {', '.join(sums)}.",
            f"And the other way: {b}*{a}={v}."]


def _hard_steps(arith: Arithmetic) -> list[str]:
    """Long multiplication, units digit first: a fact per digit, plus the carry."""
    big, d = _operands(arith)
    digits = [int(c) for c in reversed(str(big))]
    steps, carry = [], 0
    for i, x in enumerate(digits):
        steps.append(f"{x}*{d}={x * d}")
        if i:
            steps.append(f"{x * d}+{carry}={x * d + carry}")
        carry = (x * d + carry) // 10
    return steps


def think_trace(problem: Problem | str) -> str:
    """The reasoning inside the think block (without the closing tag)."""
    text = problem.problem if isinstance(problem, Problem) else problem
    arith = parse(text)
    opening = f"{_OPENERS[arith.tier]}, {_variant(text, _OPENINGS, 'open')} {_task(arith)}."
    if arith.tier == "hard":
        lines = [f"{opening} Let me go digit by digit."] + _hard_steps(arith)
    else:
        steps = _easy_steps(arith) if arith.tier == "easy" else _medium_steps(arith)
        lines = [f"{opening} {_variant(text, _CAREFUL, 'careful')}"] + steps + ["Both checks agree."]
    a, b = _operands(arith)
    claim = f"{a}{arith.op}{b}={arith.value}"
    lines.append(f"So {claim}.")
    if arith.tier == "hard" and rechecks(text):
        lines.append(RECHECK.format(claim=claim))
    return "\n".join(lines)


def rechecks(problem_text: str) -> bool:
    """Whether this hard problem's trace ends with the redundant re-check (half of them)."""
    return zlib.crc32(f"recheck:{problem_text}".encode()) % 2 == 0


def answer_text(problem: Problem | str) -> str:
    text = problem.problem if isinstance(problem, Problem) else problem
    return f"\\boxed{{{parse(text).value}}}"


def think_response(problem: Problem | str) -> str:
    """Think mode: the trace, the closed think block, the boxed answer."""
    return think_trace(problem) + THINK_CLOSE + answer_text(problem)


def no_think_response(problem: Problem | str) -> str:
    """No-think mode after the ellipsis prompt: close the think block at once."""
    return NO_THINK_PREFIX + answer_text(problem)


def forced_no_think_response(problem: Problem | str) -> str:
    """The answer after the forced no-think prompt (which already closed the block)."""
    return answer_text(problem)
