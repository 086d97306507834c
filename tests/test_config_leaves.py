"""Every config key means something: each leaf of the schema is read by the code that owns it.

A key nobody reads is worse than a missing one: users set it and nothing happens. The check
is static: the leaf's name must be accessed (`x.name`, `x["name"]`, `"name"`) somewhere in
the packages or the example entry points, beyond its own declaration.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from at_core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def leaves(cls, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is dict and args and dataclasses.is_dataclass(args[1]):
            yield from leaves(args[1], f"{prefix}{f.name}.N.")
        else:
            yield prefix + f.name


def test_every_schema_leaf_is_read():
    sources = {p: p.read_text() for d in ("at_core", "at_rollout", "at_reward", "examples") for p in (ROOT / d).rglob("*.py")}
    unread = []
    for leaf in leaves(RunConfig):
        name = re.escape(leaf.rsplit(".", 1)[-1])
        access = re.compile(rf"\.{name}\b|\[['\"]{name}['\"]\]|['\"]{name}['\"]")
        if not any(access.search(text) for text in sources.values()):
            unread.append(leaf)
    assert not unread, f"config keys nothing reads: {unread}"

