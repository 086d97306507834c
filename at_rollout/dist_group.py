"""The weight-update process group between trainer rank 0 and the rollout engines.

Built the way SGLang's `init_custom_process_group` builds it (a rendezvous on its own
TCPStore at `tcp://master_address:master_port`, a PrefixStore named after the group, then
torch's process-group helper), because both ends must lay out their store keys the same
way for an NCCL or gloo group to form between our trainer and a real SGLang server. The
group never touches the default process group: a trainer keeps its DeepSpeed group, and
our server, which has none, can still join.

Every group has a timeout, so a peer that died is an error, not a hang.
"""
from __future__ import annotations

import datetime
import inspect
import socket

import torch
import torch.distributed as dist


def create_group(backend: str, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str, timeout_s: float = 300.0):
    """Join (rank 0: host) a process group of `world_size` ranks; returns the group handle."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which this process does not have; use 'gloo'")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    # The store SGLang's `rendezvous("tcp://...")` makes, built directly: under torchrun,
    # rendezvous would join torchelastic's agent store instead of hosting ours on rank 0.
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    store = PrefixStore(group_name, store)
    # torch renamed `pg_options` to `backend_options` in 2.6; accept both.
    params = inspect.signature(_new_process_group_helper).parameters
    options = {"backend_options": None} if "backend_options" in params else {"pg_options": None}
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                         group_name=group_name, timeout=timeout, **options)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_group(group) -> None:
    if group is not None:
        dist.destroy_process_group(group)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
