"""Rollout backends, chosen in one place: `get_backend(rollout.backend)`.

Each is one adapter (`base.RolloutBackend`): `own_server.py` (the project's server, every
machine), `sglang.py` (production GPUs). Adding an engine is one file with its subclass and
one line here.
"""
from __future__ import annotations

from .base import RolloutBackend
from .own_server import OwnServer
from .sglang import SGLang

BACKENDS: dict[str, RolloutBackend] = {b.name: b for b in (OwnServer(), SGLang())}


def get_backend(name: str) -> RolloutBackend:
    """The backend registered as `name` (the value of `rollout.backend`)."""
    if name not in BACKENDS:
        raise ValueError(f"rollout.backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]


__all__ = ["BACKENDS", "RolloutBackend", "get_backend"]
