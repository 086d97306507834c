"""The small base every weight transport shares (see the package's docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class SyncStats:
    """What one sync moved, and how long it took."""

    def count(self, tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.tensors += len(tensors)
        self.bytes += sum(t.numel() * t.element_size() for _, t in tensors)

    seconds: float = 0.0
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0


def cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """`t` detached, in `dtype` (None: as it is)."""
    t = t.detach()
    return t.to(dtype) if dtype is not None and t.dtype != dtype else t


class WeightTransport:
    """Sends the buckets of a sync. Rank 0 holds the clients (`attach`); `send` runs inside a
    bucket's gather, on rank 0 alone or on every rank (`every_rank`); the hooks after it run
    on rank 0. A hook returns the failure (or None) for `WeightSync` to agree on."""

    name = ""
    method = ""  # the rollout.sync_method it serves
    every_rank = False  # every rank sends its own copy (CUDA IPC)
    wants_model_info = False  # `prepare` needs each server's /model_info

    clients: list = []
    timeout_s: float = 300.0

    def attach(self, clients: list, timeout_s: float) -> None:
        self.clients, self.timeout_s = clients, timeout_s

    def connect(self) -> None:
        """Rank 0, at the start of a sync (before the pause): set up the channel."""

    def prepare(self, infos: list[dict]) -> None:
        """Rank 0, once: what each server's /model_info says (when `wants_model_info`)."""

    def send(self, bucket: Sequence[tuple[str, torch.nn.Parameter]], dtype: Optional[torch.dtype],
             stats: SyncStats) -> Optional[BaseException]:
        """One gathered bucket of (name, parameter), cast to `dtype`."""
        raise NotImplementedError

    def after_gather(self) -> Optional[BaseException]:
        """Rank 0, once the bucket's gather has ended (pipelined sends go out here)."""
        return None

    def drain(self) -> Optional[BaseException]:
        """Rank 0, after the last bucket: wait for what is still travelling."""
        return None

    def finish(self) -> None:
        """Every rank, at the end of every sync, failed or not: free what it kept."""

    def reconnect(self) -> None:
        """Rank 0, after a server failure or restart: drop the channel (the next sync rebuilds it)."""

    def close(self) -> None:
        """Rank 0: leave the channel on both ends."""
