"""The one interface the trainer sees for a kind of rollout engine.

The trainer's handle (`at_core.rollout.RolloutWorkers`), the evaluation runner, the recipes'
dry run and the planner never test `rollout.backend` themselves: they take the backend object
from the registry (`at_rollout.backends.get_backend`) and ask it. What an engine does at run
time (generate, health, release/resume memory, the weight endpoints) is its client's job;
starting, stopping and restarting its process is its `ManagedServer`'s; how its weights
arrive is the `WeightTransport` it picks.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..client import RolloutClient
from ..process import ManagedServer
from ..transports import METHODS, WeightTransport


def get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


class RolloutBackend:
    """A rollout engine kind. Subclasses set the facts and build its server and client."""

    name = ""
    description = ""
    # Frees a finished group's batch slot at once: one group per request by default, and the
    # evaluation keeps two requests in flight. (Our server runs each merged call to its longest row.)
    continuous_batching = False
    # The n samples of one request share its sampling seed: the dispatcher sends n one-sample
    # entries, each with a seed of its own.
    seeds_samples_alike = False
    group_backend: Optional[str] = None  # of the broadcast weight-update group (None: NCCL on GPU, else gloo)
    launches_engines = False  # the trainer may launch several (`rollout.engines`), each with its threads

    # ---------------------------------------------------------------- config
    def check_config(self, rollout: Any) -> None:
        """What this engine cannot do with the `rollout` config section, as ValueErrors naming keys."""
        self.transport_name(rollout)

    def transport_name(self, rollout: Any) -> str:
        """The weight transport (`at_rollout.transports.TRANSPORTS` key) that follows from
        `rollout.sync_method` and `rollout.colocate`; ValueError naming the keys if none can work."""
        method = get(rollout, "sync_method", "tensor")
        if method not in METHODS:
            raise ValueError(f"rollout.sync_method must be one of {sorted(METHODS)}, got {method!r}")
        return METHODS[method]

    # ---------------------------------------------------------------- processes and clients
    def client(self, url: str, **kwargs) -> RolloutClient:
        """A client for one running engine (`api_key`, `timeout_s`, `retries`, ...)."""
        return RolloutClient(url, **kwargs)

    def server(self, rollout: Any, model_path: str | Path, *, seed: int = 0,
               log_file: Optional[str | Path] = None, threads: Optional[int] = None) -> ManagedServer:
        """The engine process the trainer launches (not started yet); `threads`: its torch
        threads (None: inherited), for backends that `launches_engines`."""
        raise NotImplementedError

    def launch_command(self, rollout: Any, model_path: str | Path, port: int, *, seed: int = 0,
                       dtype: str = "bfloat16", base_gpu_id: Optional[int] = None,
                       python: str = sys.executable) -> list[str]:
        """The command line that serves `model_path` on `port` (for engines started by hand)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- weights
    def transport(self, rollout: Any, engines: int) -> WeightTransport:
        """The weight transport for `engines` running engines (built alike on every rank)."""
        from ..transports import transport_class

        name = self.transport_name(rollout)
        cls = transport_class(name)
        if name == "http_tensor":
            return cls(bucket_bytes=int(float(get(rollout, "sync_bucket_mb", 256)) * (1 << 20)))
        if name == "nccl_broadcast":
            return cls(backend=self.group_backend, engine_ranks=int(get(rollout, "tp_size", 1)))
        from ..placement import runtime_ipc_placements

        return cls(runtime_ipc_placements(rollout, engines))

    def release(self, rollout: Any, clients: Sequence[RolloutClient]) -> None:
        """Colocated: free the engines' weights and KV cache for the update (rank 0)."""
        if get(rollout, "colocate", False):
            for c in clients:
                c.flush_cache()
                c.release_memory_occupation()

    def resume(self, rollout: Any, clients: Sequence[RolloutClient]) -> None:
        """Colocated: take the memory back before the new weights arrive (rank 0)."""
        if get(rollout, "colocate", False):
            for c in clients:
                c.resume_memory_occupation()
