"""Where each rollout engine runs and how the weights reach it, decided from the config alone.

The rules are the ones verl and slime follow (each backend's `transport_name` says which
transport follows, or why none can work):

- SGLang colocated (`rollout.colocate: true`): engine TP rank i runs on the GPU of a trainer
  rank, and the weights go as CUDA IPC handles through `/update_weights_from_tensor`
  (`sync_method: tensor`, `transports/cuda_ipc.py`). NCCL cannot be used: a group holding the same GPU
  twice is refused ("Duplicate GPU detected").
- SGLang on GPUs of its own: the trainer's rank 0 broadcasts over NCCL
  (`sync_method: distributed`); IPC handles would point at GPUs the engine does not see.
- The project's server: `tensor` is its HTTP safetensors body, `distributed` a gloo/NCCL group.

Engines are placed explicitly: the launched one at `--base-gpu-id` (`rollout.base_gpu_id`;
by default GPU 0 colocated, the first GPU after the node's trainer ranks apart), those started
by hand one per `tp_size` GPUs under `CUDA_VISIBLE_DEVICES`. A placement that cannot work is a
ValueError naming the keys, raised by the planner, `--dry-run` and the launcher alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from .backends import get_backend
from .backends.base import get as _get
from .transports.cuda_ipc import EnginePlacement


@dataclass(frozen=True)
class Placement:
    """The engines' GPUs and the weight-sync transport of one recipe on one cluster."""

    backend: str
    colocate: bool
    sync: str  # the weight transport (at_rollout.transports.TRANSPORTS): cuda_ipc | http_tensor | nccl_broadcast
    tp_size: int
    nodes: int
    gpus_per_node: int
    trainer_gpus_per_node: int
    engines_per_node: int
    launched: EnginePlacement  # the engine the trainer starts on rank 0's node

    @property
    def engines(self) -> int:
        return self.engines_per_node * self.nodes

    def engine(self, i: int) -> EnginePlacement:
        """Engine `i` in node-major order (the order `rollout.urls` lists them in)."""
        node, k = divmod(i, self.engines_per_node)
        first = (0 if self.colocate else self.trainer_gpus_per_node) + k * self.tp_size
        return EnginePlacement(node, tuple(range(first, first + self.tp_size)))

    def describe(self) -> str:
        how = {"cuda_ipc": "CUDA IPC handles via /update_weights_from_tensor (engine and trainer share GPUs)",
               "http_tensor": "tensor bytes over HTTP (/update_weights_from_tensor, safetensors)",
               "nccl_broadcast": "NCCL broadcast from trainer rank 0 (/update_weights_from_distributed)"}[self.sync]
        gpus = ",".join(map(str, self.launched.gpus))
        trainer = f"GPUs 0-{self.trainer_gpus_per_node - 1}" if self.trainer_gpus_per_node > 1 else "GPU 0"
        return (f"placement: weight sync {self.sync}, {how}; per node: trainer on {trainer}, "
                f"{self.engines_per_node} engine(s) of tp {self.tp_size} on GPUs "
                f"{','.join(str(g) for e in range(self.engines_per_node) for g in self.engine(e).gpus)}"
                f"{' (shared with the trainer)' if self.colocate else ''}; the launched engine: "
                f"--base-gpu-id {self.launched.gpus[0]} (GPUs {gpus} of rank 0's node)")


def resolve(rollout: Any, *, nodes: int, gpus_per_node: int, rollout_gpus: Optional[int] = None) -> Placement:
    """The placement of `rollout` (the config section) on `nodes` x `gpus_per_node` GPUs.

    `rollout_gpus` (not colocated only; default half of all GPUs) is how many serve rollouts.
    Raises ValueError naming the keys when the placement cannot work.
    """
    backend = _get(rollout, "backend", "server")
    colocate = bool(_get(rollout, "colocate", False))
    tp = int(_get(rollout, "tp_size", 1))
    base = _get(rollout, "base_gpu_id")
    urls = list(_get(rollout, "urls", None) or [])
    if tp < 1 or tp > gpus_per_node or gpus_per_node % tp:
        raise ValueError(f"rollout.tp_size={tp} must divide the {gpus_per_node} GPUs of a node (cluster.gpus_per_node)")
    sync = get_backend(backend).transport_name(rollout)  # raises naming the keys if none can work
    total = nodes * gpus_per_node
    if colocate:
        trainer_per_node, engines_per_node = gpus_per_node, gpus_per_node // tp
    else:
        rollout_gpus = total // 2 if rollout_gpus is None else rollout_gpus
        if not 0 < rollout_gpus < total or rollout_gpus % nodes or (rollout_gpus // nodes) % tp:
            raise ValueError(f"{rollout_gpus} rollout GPUs (not colocated) must leave some of the {total} GPUs to "
                             f"training and be a multiple of rollout.tp_size={tp} on each of the {nodes} node(s)")
        trainer_per_node = gpus_per_node - rollout_gpus // nodes
        engines_per_node = rollout_gpus // nodes // tp
    first = int(base) if base is not None else (0 if colocate else trainer_per_node)
    if first < 0 or first + tp > gpus_per_node:
        raise ValueError(f"rollout.base_gpu_id={first} with rollout.tp_size={tp} needs GPUs {first}-{first + tp - 1}; "
                         f"a node has {gpus_per_node} (cluster.gpus_per_node)")
    if not colocate and first < trainer_per_node:
        raise ValueError(f"rollout.base_gpu_id={first} puts the engine on a trainer GPU (the trainer holds GPUs "
                         f"0-{trainer_per_node - 1} of each node when rollout.colocate=false)")
    if urls and len(urls) * tp > (total if colocate else rollout_gpus):
        have = f"{total} GPUs (cluster.nodes x cluster.gpus_per_node)" if colocate else f"{rollout_gpus} rollout GPUs"
        raise ValueError(f"rollout.urls lists {len(urls)} engines of rollout.tp_size={tp}, {len(urls) * tp} GPUs; "
                         f"the cluster has {have}")
    return Placement(backend, colocate, sync, tp, nodes, gpus_per_node, trainer_per_node, engines_per_node,
                     EnginePlacement(0, tuple(range(first, first + tp))))


def runtime_ipc_placements(rollout: Any, engines: int) -> list[EnginePlacement]:
    """At run time, colocated SGLang: where each of the `engines` servers runs (the launched one,
    or `rollout.urls` in node-major order). A node's size comes from the launcher
    (LOCAL_WORLD_SIZE), else the visible GPUs."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or _visible_gpus() or 1
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", "0")) or 0) or max(
        1, -(-engines * int(_get(rollout, "tp_size", 1)) // per_node))
    p = resolve(rollout, nodes=nodes, gpus_per_node=per_node)
    if not list(_get(rollout, "urls", None) or []):
        return [p.launched]
    return [p.engine(i) for i in range(engines)]


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def check_sync(rollout: Any) -> None:
    """The placement rules that hold on any cluster (backend, colocate, sync_method), as ValueErrors."""
    resolve({**{k: _get(rollout, k) for k in ("backend", "sync_method", "colocate", "tp_size")},
             "base_gpu_id": None, "urls": []}, nodes=1, gpus_per_node=max(2, 2 * int(_get(rollout, "tp_size", 1))),
            rollout_gpus=int(_get(rollout, "tp_size", 1)))


def launch_base_gpu(rollout: Any) -> int:
    """The launched engine's first GPU on rank 0's node: `rollout.base_gpu_id`, else 0 colocated,
    else the first GPU after the node's trainer ranks (LOCAL_WORLD_SIZE of them)."""
    base = _get(rollout, "base_gpu_id")
    if base is not None:
        return int(base)
    return 0 if _get(rollout, "colocate", False) else int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
