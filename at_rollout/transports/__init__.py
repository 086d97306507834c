"""Weight transports: how one bucket of whole parameters reaches the rollout engines.

`WeightSync` (at_rollout/weight_sync.py) does what every transport shares: the buckets, the
ZeRO-3 gathers, the pause/flush/session/version/continue order and the all-rank agreement.
A transport only sends. One class per transport, registered by the name the placement uses:

- `http_tensor` (http_tensor.py): a safetensors blob per bucket over HTTP (our server's raw
  body, or SGLang-shaped base64 JSON);
- `cuda_ipc` (cuda_ipc.py): colocated SGLang, CUDA IPC handles from every rank;
- `nccl_broadcast` (nccl.py): announce over HTTP, broadcast over a weight-update group.
"""
from __future__ import annotations

from .base import SyncStats, WeightTransport

TRANSPORTS = {"http_tensor": "at_rollout.transports.http_tensor:HttpTensorTransport",
              "cuda_ipc": "at_rollout.transports.cuda_ipc:CudaIpcTransport",
              "nccl_broadcast": "at_rollout.transports.nccl:DistributedTransport"}
METHODS = {"tensor": "http_tensor", "distributed": "nccl_broadcast"}  # rollout.sync_method -> transport


def transport_class(name: str) -> type:
    """The class registered as `name` (a TRANSPORTS key, or a rollout.sync_method)."""
    import importlib

    key = METHODS.get(name, name)
    if key not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {name!r}; known: {sorted(TRANSPORTS)} "
                         f"(rollout.sync_method: {sorted(METHODS)})")
    module, cls = TRANSPORTS[key].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["SyncStats", "WeightTransport", "TRANSPORTS", "METHODS", "transport_class"]
