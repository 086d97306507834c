"""Problems: the unit of data every part of the pipeline passes around, and their loaders.

`load_problems` reads JSON (a list of objects), JSONL and parquet files into `Problem`s,
checking every row so a bad one is reported by file and row before any training starts.
`load_benchmark` / `load_train_set` find the copies shipped in `data/` by name; an unknown
name is a `DataError` listing the known ones.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional


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


class DataError(ValueError):
    """A data file a user pointed us at is unreadable or has a malformed row."""


def _after_hashes(text: str) -> Optional[str]:
    """GSM8K: the final answer follows the last `####` of the solution."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip() or None


ANSWER_EXTRACTORS: dict[str, Callable[[str], Optional[str]]] = {"after_hashes": _after_hashes}


def _extractor(spec: Optional[str]) -> Optional[Callable[[str], Optional[str]]]:
    """A named extractor, or a regex: its first group (or whole match) is the answer."""
    if spec is None:
        return None
    if spec in ANSWER_EXTRACTORS:
        return ANSWER_EXTRACTORS[spec]
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise DataError(
            f"answer_extract={spec!r} is neither one of {sorted(ANSWER_EXTRACTORS)} nor a valid regex: {err}"
        ) from None

    def by_regex(text: str) -> Optional[str]:
        found = list(pattern.finditer(text))
        if not found:
            return None
        m = found[-1]  # the last match: answers come at the end
        return (m.group(1) if pattern.groups else m.group(0)).strip() or None

    return by_regex


def _rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(row number, where-text for errors, row) for every row of a JSON/JSONL/parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types
            raise DataError(f"{path}: cannot read parquet: {err}") from None
        for i, row in enumerate(table.to_pylist()):
            yield i, f"row {i}", row
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    if suffix == ".jsonl":
        i = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: row {i} (line {lineno}): invalid JSON: {err.msg}") from None
            yield i, f"row {i} (line {lineno})", row
            i += 1
        return
    if suffix != ".json":
        raise DataError(f"{path}: unsupported data file type {suffix!r} (use .json, .jsonl or .parquet)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield i, f"row {i}", row


def read_rows(path: str | os.PathLike) -> list[Any]:
    """Every row of a data file as read (no checks): the fields `Problem` does not keep."""
    return [row for _, _, row in _rows(Path(path))]


def _check_answer(value: Any) -> Optional[str]:
    """Why `value` is not a usable gold answer, or None when it is."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        return "is an empty list"
    for v in items:
        if v is None:
            return "is null"
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            return f"has type {type(v).__name__} (expected str, number or a list of them)"
        if isinstance(v, str) and not v.strip():
            return "is empty"
        if isinstance(v, float) and not math.isfinite(v):
            return f"is not a finite number ({v})"
    return None


def _tier(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def load_problems(
    path: str | os.PathLike,
    problem_key: str = "problem",
    answer_key: str = "answer",
    answer_extract: Optional[str] = None,
    tier_key: Optional[str] = None,
) -> list[Problem]:
    """Read every row of a .json (list), .jsonl or .parquet file as a `Problem`.

    `answer_extract` turns a text field into the gold answer: "after_hashes" (GSM8K's
    `#### 42`) or a regex whose first group (else whole match; last match wins) is the
    answer. A row missing `tier_key` gets tier None. Any malformed row raises `DataError`
    naming the file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    extract = _extractor(answer_extract)
    problems = []
    for i, where, row in _rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where}: expected an object, got {type(row).__name__}")
        for key in (problem_key, answer_key):
            if key not in row:
                raise DataError(f"{path}: {where}: missing field {key!r} (fields: {', '.join(sorted(map(str, row)))})")
        text = row[problem_key]
        if not isinstance(text, str):
            raise DataError(f"{path}: {where}: field {problem_key!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{path}: {where}: field {problem_key!r} is empty")
        answer = row[answer_key]
        if extract is not None:
            if not isinstance(answer, str):
                raise DataError(
                    f"{path}: {where}: answer_extract needs field {answer_key!r} to be a string, "
                    f"got {type(answer).__name__}"
                )
            answer = extract(answer)
            if answer is None:
                raise DataError(
                    f"{path}: {where}: answer_extract={answer_extract!r} found no answer in field {answer_key!r}"
                )
        problem = _check_answer(answer)
        if problem is not None:
            raise DataError(f"{path}: {where}: field {answer_key!r} {problem}")
        tier = _tier(row.get(tier_key)) if tier_key else None
        problems.append(Problem(problem=text, answer=answer, tier=tier, source=str(path), index=i))
    if not problems:
        raise DataError(f"{path}: no rows")
    return problems


class DatasetSpec(NamedTuple):
    """Where a shipped data set lives under the data directory and how to read it."""

    path: str
    problem_key: str = "problem"
    answer_key: str = "answer"
    answer_extract: Optional[str] = None
    tier_key: Optional[str] = None


# The five evaluation benchmarks of the paper plus GSM8K (see data/README.md).
BENCHMARKS: dict[str, DatasetSpec] = {
    "math500": DatasetSpec("benchmarks/math500.json", tier_key="difficulty"),  # MATH levels 1-5
    "aime24": DatasetSpec("benchmarks/aime24.json"),
    "amc": DatasetSpec("benchmarks/amc.json"),
    "minerva": DatasetSpec("benchmarks/minerva.json"),
    "olympiadbench": DatasetSpec("benchmarks/olympiadbench.json"),
    "gsm8k": DatasetSpec("benchmarks/gsm8k.json", answer_key="solution", answer_extract="after_hashes"),
}
PAPER_BENCHMARKS = ("math500", "minerva", "olympiadbench", "aime24", "amc")
TRAIN_SETS: dict[str, DatasetSpec] = {
    "math": DatasetSpec("train/math.json", tier_key="difficulty"),
    "aime": DatasetSpec("train/aime.json"),
}


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The shipped data: `override`, else $AUTOTHINK_DATA_DIR, else `data/` in the repo."""
    chosen = override or os.environ.get("AUTOTHINK_DATA_DIR")
    return Path(chosen) if chosen else Path(__file__).resolve().parent.parent / "data"


def _load_named(table: dict[str, DatasetSpec], kind: str, name: str, root: str | os.PathLike | None) -> list[Problem]:
    if name not in table:
        raise DataError(f"unknown {kind} {name!r}; known: {', '.join(table)}")
    spec = table[name]
    return load_problems(
        data_dir(root) / spec.path, spec.problem_key, spec.answer_key, spec.answer_extract, spec.tier_key
    )


def load_benchmark(name: str, root: str | os.PathLike | None = None) -> list[Problem]:
    """A shipped benchmark by name (keys of `BENCHMARKS`)."""
    return _load_named(BENCHMARKS, "benchmark", name, root)


def load_train_set(name: str, root: str | os.PathLike | None = None) -> list[Problem]:
    """A shipped training set by name (keys of `TRAIN_SETS`)."""
    return _load_named(TRAIN_SETS, "training set", name, root)
