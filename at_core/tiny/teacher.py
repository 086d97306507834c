"""The teacher: correct R1-style responses for tiny-task problems, in both modes.

Think mode (the text after the prompt's `<think>\\n`): `TRACE\\n</think>\\n\\n\\boxed{N}`.
No-think mode (after the ellipsis prompt `<think>\\n...\\n`): `</think>\\n\\n\\boxed{N}`.
Forced no-think (after `...\\n</think>\\n\\n`): `\\boxed{N}`. The end-of-sequence token
is the tokenizer's business and is appended by whoever tokenises.

Every step a trace writes is something a tiny model can compute from a few tokens it can
see: copying an operand, a single-digit fact (`7*6=42`), a small addition (`24+56=80`),
the next number when counting, a digit taken from an earlier line. A hard product is
computed column by column:

    7*6=42          units column; its tens digit (4) is the carry
    4*6=24          the two products of the tens column
    7*8=56
    24+56=80
    80+4=84         plus the carry: tens digit 4, carry 8
    4*8=32          hundreds column
    32+8=40         plus the carry: the leading digits
    So 47*86=4042.  leading digits, then the tens and units digits above

Easy and medium problems get traces of a similar length, because R1-style models
overthink easy problems too: a preamble, the fact, and a double-check (counting up for
addition and subtraction, repeated addition for the multiplication table). That makes a
think response several times longer than a no-think one on every tier, which is what
lets AutoThink save tokens by skipping thought on easy problems.
"""
from __future__ import annotations

import zlib

from at_core.data import Problem
from at_core.tiny.task import Arithmetic, parse

NO_THINK_PREFIX = "</think>\n\n"
THINK_CLOSE = "\n</think>\n\n"

_OPENINGS = ("Okay, so I need to", "Alright, I need to", "Hmm, I need to")
_CAREFUL = ("This looks simple, but let me be careful.", "Let me work it out carefully.")


def _variant(text: str, options: tuple[str, ...], salt: str) -> str:
    """A wording picked by the problem text: the teacher stays a function of the problem."""
    return options[zlib.crc32(f"{salt}:{text}".encode()) % len(options)]


def _task(arith: Arithmetic) -> str:
    a, b = arith.a, arith.b
    return {"+": f"add {a} and {b}", "-": f"subtract {b} from {a}", "*": f"multiply {a} by {b}"}[arith.op]


def _count_up(start: int, stop: int) -> str:
    return ", ".join(str(k) for k in range(start + 1, stop + 1))


def _easy_steps(arith: Arithmetic) -> list[str]:
    a, b, v = arith.a, arith.b, arith.value
    if arith.op == "+":
        low = min(a, b)
        return [f"{a}+{b}={v}", f"Let me double-check by counting up from {low}: {_count_up(low, v)}.",
                f"And the other way: {b}+{a}={v}."]
    return [f"{a}-{b}={v}", f"Let me double-check by counting up from {v}: {_count_up(v, a)}.",
            f"And adding back: {v}+{b}={a}."]


def _medium_steps(arith: Arithmetic) -> list[str]:
    a, b, v = arith.a, arith.b, arith.value
    small, big = min(a, b), max(a, b)
    sums = [f"{big * k}+{big}={big * (k + 1)}" for k in range(1, small)]
    return [f"{a}*{b}={v}", f"Let me double-check by adding {small} copies of {big}: {', '.join(sums)}.",
            f"And the other way: {b}*{a}={v}."]


def _hard_steps(arith: Arithmetic) -> list[str]:
    a, b = arith.a, arith.b
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    units = a0 * b0
    cross = a1 * b0 + a0 * b1
    tens = cross + units // 10
    lead = a1 * b1 + tens // 10
    return [
        f"{a0}*{b0}={units}",
        f"{a1}*{b0}={a1 * b0}",
        f"{a0}*{b1}={a0 * b1}",
        f"{a1 * b0}+{a0 * b1}={cross}",
        f"{cross}+{units // 10}={tens}",
        f"{a1}*{b1}={a1 * b1}",
        f"{a1 * b1}+{tens // 10}={lead}",
    ]


def think_trace(problem: Problem | str) -> str:
    """The reasoning inside the think block (without the closing tag)."""
    text = problem.problem if isinstance(problem, Problem) else problem
    arith = parse(text)
    opening = f"{_variant(text, _OPENINGS, 'open')} {_task(arith)}."
    if arith.tier == "hard":
        lines = [f"{opening} Let me go digit by digit."] + _hard_steps(arith)
    else:
        steps = _easy_steps(arith) if arith.tier == "easy" else _medium_steps(arith)
        lines = [f"{opening} {_variant(text, _CAREFUL, 'careful')}"] + steps + ["Both checks agree."]
    lines.append(f"So {arith.a}{arith.op}{arith.b}={arith.value}.")
    return "\n".join(lines)


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
