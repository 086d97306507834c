"""Push the trainer's weights into rollout servers after a policy update.

`WeightSync.sync(model)` is called on ALL trainer ranks. Parameters are walked in buckets
(`bucket_mb`); ZeRO-3 partitioned parameters are gathered one bucket at a time
(`at_core.zero.gathered`), so the extra memory is about one bucket. Rank 0 alone talks to the
servers:

    pause_generation -> flush_cache -> [begin_weight_update] -> one update per bucket
        -> [end_weight_update] -> update_weight_version -> continue_generation

The bracketed session is opened where the server has one (SGLang >= 0.5.21 and our own
server refuse updates outside it; asked once per server, `RolloutClient.
needs_weight_update_session`). The weight version (the policy's step) is set once every
bucket is in, so a generation's `meta_info.weight_version` never names partial weights.

How a bucket travels is the transport's business (`at_rollout/transports/`: HTTP tensor
body, CUDA IPC handles, NCCL/gloo broadcast); this class keeps what they share: buckets,
gathers, the order above, and the agreement. After every step rank 0 tells the other ranks
whether it succeeded (one tiny broadcast on the default group; on failure the message too),
so a server failure raises the same RolloutError, with the same status, on every rank
instead of leaving ranks 1..N waiting in the next gather. After a failure the servers stay
paused, holding a mix of old and new weights (an open session is closed): re-sync (or
restart them) before generating again.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from at_core.zero import buckets, gathered, hf_name, named_params

from .client import RolloutClient, RolloutError
from .tensor_codec import parse_dtype
from .transports import SyncStats, WeightTransport
from .transports.http_tensor import HttpTensorTransport
from .transports.nccl import DistributedTransport

MB = 1 << 20


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class WeightSync:
    """Weight sync from a (ZeRO-3) trainer into rollout servers; build it on every rank.

    `clients` is the server(s) on rank 0 and None on the other ranks. `transport` is a
    `WeightTransport` or a rollout.sync_method: `tensor` (HTTP tensor body: `tensor_body`,
    `in_flight`) or `distributed` (a broadcast group: `backend`, `master_address`,
    `master_port`, `group_name`, `engine_ranks` = GPUs per server). `dtype` is what tensors
    are cast to before sending; by default the dtype the server reports in /model_info (ours
    does; SGLang does not: then the trainer's own dtype).
    """

    def __init__(self, clients: RolloutClient | Sequence[RolloutClient] | None,
                 transport: str | WeightTransport = "tensor", bucket_mb: float = 256, *,
                 backend: Optional[str] = None, master_address: Optional[str] = None, master_port: int = 0,
                 group_name: str = "weight_update_group", engine_ranks: int = 1, timeout_s: float = 300.0,
                 dtype: Optional[torch.dtype | str] = None, name_map: Callable[[str], Optional[str]] = hf_name,
                 pause_mode: Optional[str] = None, in_flight: int = 2, tensor_body: str = "auto"):
        if bucket_mb <= 0:
            raise ValueError(f"rollout.sync_bucket_mb must be > 0, got {bucket_mb}")
        self.bucket_bytes = int(bucket_mb * MB)
        if transport == "tensor":
            transport = HttpTensorTransport(tensor_body, in_flight, self.bucket_bytes)
        elif transport == "distributed":
            transport = DistributedTransport(backend, master_address, master_port, group_name, engine_ranks)
        elif not isinstance(transport, WeightTransport):
            raise ValueError(f"rollout.sync_method must be 'tensor' or 'distributed', got {transport!r}")
        self.transport = transport
        self.method = transport.method
        self.clients = [] if clients is None else ([clients] if isinstance(clients, RolloutClient) else list(clients))
        self.timeout_s = timeout_s
        self.dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        self.name_map = name_map
        self.pause_mode = pause_mode
        self._asked = False  # the servers' dtype and bodies (once)
        self._sessions: list[bool] = []  # per client: updates need a weight-update session
        self._open: list[RolloutClient] = []  # clients whose session this sync opened
        self._synced = False
        if _rank() == 0 and not self.clients:
            raise ValueError("WeightSync on rank 0 needs the rollout server client(s)")
        transport.attach(self.clients, timeout_s)

    # ---------------------------------------------------------------- the transport's channel
    def connect(self) -> None:
        """Rank 0: set up the transport's channel now (the distributed group) instead of at the
        first sync."""
        if _rank() == 0:
            self.transport.connect()

    def reconnect(self) -> None:
        """After a server failure or restart (any rank; only rank 0 acts): drop the channel on
        every live server and here. The next `sync` builds it again, inside its agreed steps,
        so a failure to build it raises on every rank."""
        if _rank() == 0:
            self.transport.reconnect()

    def close(self) -> None:
        """Rank 0: leave the channel on both ends (servers may already be gone)."""
        if _rank() == 0:
            self.transport.close()

    # ---------------------------------------------------------------- sync
    def sync(self, model: torch.nn.Module, weight_version: Optional[str] = None) -> SyncStats:
        """Send every parameter of `model` to the servers (collective: call it on all ranks);
        `weight_version` (the policy's step) names the weights once they are all in."""
        start = time.perf_counter()
        rank0, t = _rank() == 0, self.transport
        named = named_params(model, self.name_map)
        self._agree(self._on_rank0(self._begin) if rank0 else None)
        stats = SyncStats()
        try:
            for bucket in buckets(named, self.bucket_bytes):
                failure = None
                with gathered([p for _, p in bucket]), torch.no_grad():
                    if t.every_rank:  # collective: it reports every rank's failure through rank 0
                        failure = t.send(bucket, self.dtype, stats)
                    elif rank0:
                        try:
                            failure = t.send(bucket, self.dtype, stats)
                        except Exception as err:  # agreed on below
                            failure = err
                if rank0 and failure is None:
                    failure = t.after_gather()
                self._agree(failure)
                stats.buckets += 1
            self._agree(t.drain() if rank0 else None)
            self._agree(self._on_rank0(lambda: self._end(weight_version)) if rank0 else None)
        finally:
            t.finish()
            self._close_sessions()  # only after a failure is one still open
        stats.seconds = time.perf_counter() - start
        return stats

    def _begin(self) -> None:
        """Rank 0, before the first bucket: the channel, what each server takes, pause, flush, session."""
        self.transport.connect()
        self._ask_servers()
        for c in self.clients:
            c.pause_generation(self.pause_mode)
            c.flush_cache()
        for c, needed in zip(self.clients, self._sessions):
            if needed and not self._synced:  # a session a trainer that died left open
                with contextlib.suppress(RolloutError):
                    c.end_weight_update()
            if needed:
                c.begin_weight_update()
                self._open.append(c)
        self._synced = True

    def _end(self, weight_version: Optional[str]) -> None:
        """Rank 0, after the last bucket: close the session, name the weights, generate again."""
        while self._open:
            self._open[0].end_weight_update()
            self._open.pop(0)
        for c in self.clients:
            if weight_version is not None:
                c.update_weight_version(str(weight_version))
            c.continue_generation()

    def _close_sessions(self) -> None:
        while self._open:
            with contextlib.suppress(RolloutError):
                self._open[0].end_weight_update()
            self._open.pop(0)

    @staticmethod
    def _on_rank0(step: Callable[[], None]) -> Optional[BaseException]:
        try:
            step()
        except Exception as err:  # agreed on by every rank right after
            return err
        return None

    def _ask_servers(self) -> None:
        """Once: which server needs a weight-update session, the served dtype (if the server
        says) and what the transport wants to know from /model_info."""
        if self._asked:
            return
        self._sessions = [c.needs_weight_update_session() for c in self.clients]
        if self.dtype is None or self.transport.wants_model_info:
            infos = [c.model_info() for c in self.clients]
            if self.dtype is None:
                served = infos[0].get("dtype")
                self.dtype = parse_dtype(served) if served else None
            self.transport.prepare(infos)
        self._asked = True

    def _agree(self, failure: Optional[BaseException]) -> None:
        """Rank 0 tells every rank whether to go on; on failure all ranks raise the same
        RolloutError (message and HTTP status: a 4xx is `refused`, never worth a retry)."""
        status = failure.status if isinstance(failure, RolloutError) else None
        message = None if failure is None else (
            str(failure) if isinstance(failure, RolloutError) else f"{type(failure).__name__}: {failure}")
        if _world() > 1:
            device = torch.device("cpu")
            if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
            flag = torch.tensor([0 if failure is None else 1], device=device)
            dist.broadcast(flag, src=0)
            if int(flag.item()):
                box = [(message, status)]
                dist.broadcast_object_list(box, src=0)
                message, status = box[0]
        if message is not None:
            raise RolloutError(f"weight sync failed: {message}. The rollout servers are left paused with partly "
                               "updated weights; sync again (or restart them) before generating.", status)
