"""Problems: the unit of data every part of the pipeline passes around."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer.

    `answer` keeps the file's type (str, int/float, or a list of alternatives); graders
    accept all three. `tier` is an optional difficulty label used for per-tier metrics.
    """

    problem: str
    answer: Any
    tier: Optional[str] = None
    source: str = ""  # file (or generator) the row came from
    index: int = -1  # row number within `source`
