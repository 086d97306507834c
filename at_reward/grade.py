"""Grade: the verdict every grader returns, whatever the domain."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Grade:
    """One graded response.

    `format_ok` is False when the response never reached a gradable answer (no `</think>`,
    no `\\boxed{}`): AutoThink scores that 0 in both modes, unlike a wrong answer.
    `answer` is the extracted answer text (None when there was none).
    """

    correct: bool
    format_ok: bool
    answer: Optional[str] = None


FORMAT_ERROR = Grade(correct=False, format_ok=False, answer=None)
