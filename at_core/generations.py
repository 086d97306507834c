"""`generations.jsonl`: every graded evaluation sample, one line each, written as it is graded.

A long evaluation (16 samples x 32K tokens) must survive an interruption: each line is
appended and flushed on its own, so a killed run keeps everything it graded, and a torn
last line (killed mid-write) is dropped on reading. The settings that decide what a sample
is (model, prompt style, sampling, seed, problem set) go to a sidecar,
`generations.settings.json`, written before the first sample; `--resume` continues only
when today's settings equal the sidecar's, so one file never mixes two evaluations.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Set, Tuple

GENERATIONS = "generations.jsonl"
SETTINGS = "generations.settings.json"
Key = Tuple[str, int, int]  # (source, problem index in its file, sample index)


class ResumeError(ValueError):
    """`--resume` was asked for a file made with other settings, or a file is in the way."""


def key_of(record: Dict[str, Any]) -> Key:
    return record["source"], int(record["problem_index"]), int(record["sample"])


def read_records(path: str | os.PathLike) -> List[Dict[str, Any]]:
    """Every complete line of a generations file; a torn last line is skipped, a torn middle one is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if lineno == len(lines):  # no newline after it: the write was cut short
                break
            raise ResumeError(f"{path}: line {lineno}: invalid JSON ({err.msg}); not a file this runner wrote") from None
    return records


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    return [f"{k} {json.dumps(old.get(k))} (file) vs {json.dumps(new.get(k))} (now)"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class GenerationsLog:
    """The generations file of one evaluation directory: open it, learn what is done, append."""

    def __init__(self, out_dir: str | os.PathLike, settings: Dict[str, Any], *, resume: bool, overwrite: bool = False):
        self.dir = Path(out_dir)
        self.path = self.dir / GENERATIONS
        self.settings_path = self.dir / SETTINGS
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        self.records: List[Dict[str, Any]] = []
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and resume and not overwrite:
            self._check_settings()
            self.records = read_records(self.path)
            self._drop_torn_tail()
        elif exists and not overwrite:
            raise ResumeError(f"{self.path} exists: pass --resume to continue it, --overwrite to start over, "
                              "or another --out")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
            self.settings_path.write_text(json.dumps(self.settings, indent=2) + "\n")
        self.done: Set[Key] = {key_of(r) for r in self.records}
        self._file = None

    def _check_settings(self) -> None:
        if not self.settings_path.exists():
            raise ResumeError(f"--resume: {self.settings_path} is missing, so the settings of {self.path} are unknown")
        try:
            old = json.loads(self.settings_path.read_text())
        except json.JSONDecodeError as err:
            raise ResumeError(f"--resume: {self.settings_path}: invalid JSON ({err.msg})") from None
        diff = _differences(old, self.settings)
        if diff:
            raise ResumeError(f"--resume: {self.path} was made with other settings: {'; '.join(diff)}")

    def _drop_torn_tail(self) -> None:
        """Rewrite the file without a torn last line, so appends start on a line of their own."""
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            keep = text[: text.rfind("\n") + 1]
            self.path.write_text(keep, encoding="utf-8")

    def append(self, records: Iterable[Dict[str, Any]]) -> int:
        """Write the records not already in the file, each flushed on its own; returns how many."""
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        written = 0
        for r in records:
            k = key_of(r)
            if k in self.done:
                continue
            self._file.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            self._file.flush()
            self.done.add(k)
            self.records.append(r)
            written += 1
        return written

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def ordered(self, order: Dict[Tuple[str, int], int]) -> List[Dict[str, Any]]:
        """The records sorted by problem (the evaluation's order) and sample, whatever order they were written in."""
        return sorted(self.records, key=lambda r: (order.get((r["source"], int(r["problem_index"])), 1 << 60),
                                                   int(r["sample"])))

    def __enter__(self) -> "GenerationsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

