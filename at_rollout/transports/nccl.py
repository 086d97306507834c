"""`nccl_broadcast` (rollout.sync_method `distributed`): announce, then broadcast from rank 0.

Each bucket is announced with `/update_weights_from_distributed` and its tensors are
broadcast from trainer rank 0 over a dedicated weight-update group (NCCL on GPU, gloo on a
CPU server; `dist_group.py`) that leaves the trainer's default group alone. The group is
formed at the start of a sync that has none; forming it first destroys a group of the same
name on every server (SGLang refuses "group name has already been created", e.g. after a
trainer died). A dead peer is an error within `timeout_s`.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from ..client import RolloutError
from ..dist_group import create_group, destroy_group, free_port
from ..tensor_codec import dtype_name
from .base import SyncStats, WeightTransport, cast


class DistributedTransport(WeightTransport):
    name = "nccl_broadcast"
    method = "distributed"

    def __init__(self, backend: Optional[str] = None, master_address: Optional[str] = None, master_port: int = 0,
                 group_name: str = "weight_update_group", engine_ranks: int = 1):
        self.backend = backend  # None: NCCL where CUDA is, else gloo
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.engine_ranks = engine_ranks  # GPUs per server (SGLang's tp_size): the group's world
        self._group = None

    def connect(self) -> None:
        """Rank 0: form the weight-update group with every server (if there is none)."""
        if self._group is not None:
            return
        self._drop_server_groups()
        backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        address = self.master_address or _address_towards(self.clients[0].url)
        port = self.master_port or free_port(address if address != "0.0.0.0" else "127.0.0.1")
        world = 1 + self.engine_ranks * len(self.clients)
        errors = _each(self.clients, lambda i, c: c.init_weights_update_group(
            address, port, 1 + i * self.engine_ranks, world, self.group_name, backend, timeout_s=self.timeout_s + 30))
        try:
            group = create_group(backend, address, port, 0, world, self.group_name, self.timeout_s)
        except Exception as err:
            errors.join(self.timeout_s + 60)
            refused = next((e for e in errors.errors if isinstance(e, RolloutError) and e.refused), None)
            raise RolloutError(f"forming weight update group at {address}:{port} ({backend}, world {world}) "
                               f"failed: {err}; server side: {[str(e) for e in errors.errors] or 'no error'}",
                               refused.status if refused else None) from None
        errors.join(self.timeout_s + 60)
        if errors.errors:
            destroy_group(group)
            raise errors.errors[0]
        self._group = group

    def send(self, bucket, dtype, stats: SyncStats):
        tensors = [(n, cast(p.data, dtype)) for n, p in bucket]
        stats.count(tensors)
        names = [n for n, _ in tensors]
        dtypes = [dtype_name(t.dtype) for _, t in tensors]
        shapes = [list(t.shape) for _, t in tensors]
        announced = _each(self.clients, lambda i, c: c.update_weights_from_distributed(
            names, dtypes, shapes, self.group_name, flush_cache=False, timeout_s=self.timeout_s + 30))
        try:
            # Issued all at once and then waited on: the per-call overhead overlaps the transfers.
            sent = [t.contiguous() for _, t in tensors]
            for work in [dist.broadcast(t, src=0, group=self._group, async_op=True) for t in sent]:
                work.wait()
        finally:
            announced.join(self.timeout_s + 60)
        return announced.errors[0] if announced.errors else None

    def reconnect(self) -> None:
        self._drop_server_groups()
        if self._group is not None:
            destroy_group(self._group)
            self._group = None

    def close(self) -> None:
        if self._group is not None:
            self.reconnect()

    def _drop_server_groups(self) -> None:
        """Ask every server to destroy its weight-update group; one it does not have, or a
        server that is gone, is no error here."""
        for c in self.clients:
            with contextlib.suppress(RolloutError):
                c.destroy_weights_update_group(self.group_name, retries=0)


class _Calls:
    """Calls running on their own threads (each blocks until rank 0 broadcasts)."""

    def __init__(self, threads, errors):
        self.threads, self.errors = threads, errors

    def join(self, timeout_s: float) -> None:
        for t in self.threads:
            t.join(timeout_s)


def _each(clients, call) -> _Calls:
    errors: list[BaseException] = []

    def run(i, c):
        try:
            call(i, c)
        except BaseException as err:  # reported on the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    return _Calls(threads, errors)


def _address_towards(url: str) -> str:
    """The local address the server can reach us at (loopback for a local server)."""
    host = urlparse(url).hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))  # no packet is sent; this only picks the outgoing interface
        return sock.getsockname()[0]
