"""Math grading: the last `\\boxed{}` after the last `</think>`, checked by math-verify.

`grade` runs in the calling process and is bounded only by math-verify's own
`signal.alarm` timeouts (main thread only; and an alarm cannot interrupt a long C call
such as a huge integer power). Training grades untrusted model text, so it goes through
`at_reward.pool.GradingPool`, which runs `verify_answer` in worker processes under a
wall-clock limit. The cheap parts (extraction, exact and integer matches) stay here so the
pool only pays for math-verify where it is needed.
"""
from __future__ import annotations

import math
import re
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from typing import Any, Optional, Sequence

from at_reward.grade import FORMAT_ERROR, Grade

THINK_END = "</think>"
# No benchmark gold is longer than 230 characters; a longer answer only counts when it
# matches a gold exactly, which keeps 50,000-character junk away from the LaTeX parser.
MAX_ANSWER_CHARS = 2000
DEFAULT_VERIFY_TIMEOUT_S = 2  # math-verify's alarm, whole seconds, per parse / comparison

_INT = re.compile(r"[+-]?\d+")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{(\d+)\}|([+-]?\d+)\s*/\s*(\d+)")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _box_content(text: str, i: int) -> Optional[str]:
    """Content of the box command ending at `i`; None if it is unterminated."""
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        depth, k = 0, j
        while k < len(text):
            ch = text[k]
            if ch == "\\":  # \{ and \} are literal braces, \\ is a line break
                k += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k]
            k += 1
        return None
    if j > i:  # `\boxed 5`: up to the end of the math or the line
        rest = re.split(r"[$\n]", text[j:], maxsplit=1)[0]
        return rest.strip().rstrip(".") or None
    return None


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` / `\\boxed x` / `\\fbox{...}` in `text`."""
    last = None
    for last in _BOX.finditer(text):
        pass
    return None if last is None else _box_content(text, last.end())


def extract_answer(response: str) -> Optional[str]:
    """The final answer: the last box after the LAST `</think>`; None is a format error."""
    cut = response.rfind(THINK_END)
    if cut < 0:
        return None
    return extract_boxed(response[cut + len(THINK_END) :])


def gold_alternatives(gold: Any) -> tuple[str, ...]:
    """A gold answer of any stored type as the strings that count as correct.

    Numbers lose a spurious `.0` (AMC stores 142.0 for 142); a list means any of its
    items is accepted. Anything else (None, bool, dict, empty) is a data error.
    """
    items = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    out = []
    for g in items:
        if isinstance(g, bool) or g is None:
            raise TypeError(f"gold answer must be str, int, float or a list of them, got {g!r}")
        if isinstance(g, int):
            out.append(str(g))
        elif isinstance(g, float):
            if not math.isfinite(g):
                raise ValueError(f"gold answer is not a finite number: {g!r}")
            out.append(str(int(g)) if g.is_integer() else format(Decimal(repr(g)), "f"))
        elif isinstance(g, str):
            if g.strip():
                out.append(g.strip())
        else:
            raise TypeError(f"gold answer must be str, int, float or a list of them, got {type(g).__name__}")
    if not out:
        raise ValueError(f"gold answer has no usable alternative: {gold!r}")
    return tuple(out)


def _plain(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return s


def _rational(s: str) -> Optional[Fraction]:
    """An integer or a fraction of integers (`-3`, `\\frac{7}{2}`, `7/2`), else None."""
    if _INT.fullmatch(s):
        return Fraction(int(s))
    m = _FRAC.fullmatch(s)
    if m is None:
        return None
    sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return -value if sign == "-" else value


def quick_match(answer: str, golds: Sequence[str]) -> Optional[bool]:
    """Decide the easy cases without math-verify; None means "ask math-verify".

    True for the same text or the same decimal number. When the answer and every gold
    are integers or fractions of integers, exact comparison decides (math-verify compares
    such values exactly too). False when the answer is too long to be parsed safely.
    """
    a = _plain(answer)
    plain = [_plain(g) for g in golds]
    if a in plain:
        return True
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    if _DECIMAL.fullmatch(a):
        for g in plain:
            if _DECIMAL.fullmatch(g):
                try:
                    if Decimal(a) == Decimal(g):
                        return True
                except InvalidOperation:
                    pass
    ra = _rational(a)
    if ra is not None:
        rg = [_rational(g) for g in plain]
        if all(r is not None for r in rg):
            return ra in rg
    return None


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int):
    from math_verify import parse

    text = gold if "\\boxed" in gold else "\\boxed{" + gold + "}"
    parsed = parse(text, parsing_timeout=timeout_s)
    return parsed or parse("$" + _plain(gold) + "$", parsing_timeout=timeout_s)


def verify_answer(answer: str, golds: Sequence[str], timeout_s: Optional[int] = DEFAULT_VERIFY_TIMEOUT_S) -> bool:
    """math-verify, gold first: `verify(parse(gold), parse(answer))` for any alternative.

    Both sides are wrapped in `\\boxed{}` so math-verify's LaTeX extractor sees exactly the
    answer. Its alarms only work on the main thread; elsewhere they are switched off.
    """
    from math_verify import parse, verify

    if threading.current_thread() is not threading.main_thread():
        timeout_s = None
    quick = quick_match(answer, golds)
    if quick is not None:
        return quick
    target = parse("\\boxed{" + answer + "}", parsing_timeout=timeout_s)
    if not target:
        return False
    return any(verify(_parse_gold(g, timeout_s), target, timeout_seconds=timeout_s) for g in golds)


def grade(response: str, gold: Any) -> Grade:
    """Grade one response in this process (see the module note on bounds)."""
    golds = gold_alternatives(gold)
    answer = extract_answer(response)
    if answer is None:
        return FORMAT_ERROR
    return Grade(correct=bool(verify_answer(answer, golds)), format_ok=True, answer=answer)
