"""Push the trainer's weights into rollout servers after a policy update.

`WeightSync.sync(model)` is called on ALL trainer ranks. Parameters are walked in buckets
(`bucket_mb`); ZeRO-3 partitioned parameters (`hasattr(p, "ds_id")`) are gathered one
bucket at a time with `deepspeed.zero.GatheredParameters(..., modifier_rank=None)`, so the
extra memory is about one bucket. Rank 0 alone talks to the servers:

    pause_generation -> flush_cache -> [begin_weight_update] -> one update per bucket
        -> [end_weight_update] -> update_weight_version -> continue_generation

The bracketed session is opened where the server has one (SGLang >= 0.5.21 and our own
server refuse updates outside it; asked once per server, `RolloutClient.
needs_weight_update_session`). The weight version (the policy's step) is set once every
bucket is in, so a generation's `meta_info.weight_version` never names partial weights.

Two transports, the two SGLang offers:

- `tensor`: each bucket is one `/update_weights_from_tensor` request carrying a safetensors
  blob (our server; SGLang's own encoding is pickled CUDA IPC handles): the raw request
  body where the server lists "binary" in /model_info's `tensor_update_bodies` (ours
  does), base64 in SGLang's JSON body otherwise. Up to `in_flight` bucket requests travel
  while the ranks gather and serialize the next bucket; rank 0 keeps `in_flight + 1`
  bucket-sized send buffers from one sync to the next.
- `distributed`: each bucket is announced with `/update_weights_from_distributed` and its
  tensors are broadcast from rank 0 over a dedicated weight-update group (gloo on CPU,
  NCCL on GPU; see `dist_group.py`) that leaves the trainer's default group alone.

After every step rank 0 tells the other ranks whether it succeeded (one tiny broadcast on
the default group; on failure the message too), so a server failure raises the same
RolloutError, with the same status, on every rank instead of leaving ranks 1..N waiting in
the next gather. After a failure the servers stay paused, holding a mix of old and new
weights (an open session is closed): re-sync (or restart them) before generating again.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from .client import RolloutClient, RolloutError
from .cuda_ipc import CudaIpcTransport
from .dist_group import create_group, destroy_group, free_port
from . import tensor_codec
from .tensor_codec import dtype_name, parse_dtype

MB = 1 << 20


@dataclass
class SyncStats:
    seconds: float
    buckets: int
    tensors: int
    bytes: int


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def full_numel(p: torch.Tensor) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_id") else p.numel()


def full_shape(p: torch.Tensor) -> list[int]:
    return list(p.ds_shape) if hasattr(p, "ds_id") else list(p.shape)


def hf_name(name: str) -> str:
    """Parameter names as the served HF model knows them (a DeepSpeed engine adds `module.`)."""
    return name[len("module."):] if name.startswith("module.") else name


def hf_module(model: torch.nn.Module) -> torch.nn.Module:
    """The outermost Hugging Face model inside `model` (a DeepSpeed engine, a policy wrapper),
    whose parameter names are the ones the served model uses; `model` itself if there is none."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return model
    for _, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return module
    return model


class WeightSync:
    """Weight sync from a (ZeRO-3) trainer into rollout servers; build it on every rank.

    `clients` is the server(s) on rank 0 and None on the other ranks. `engine_ranks` is the
    number of GPUs per server (SGLang's tp_size) for the distributed group's world size.
    `dtype` is what tensors are cast to before sending; by default the dtype the server
    reports in /model_info (ours does; SGLang does not: then the trainer's own dtype).
    """

    def __init__(self, clients: RolloutClient | Sequence[RolloutClient] | None, method: str = "tensor",
                 bucket_mb: float = 256, *, backend: Optional[str] = None, master_address: Optional[str] = None,
                 master_port: int = 0, group_name: str = "weight_update_group", engine_ranks: int = 1,
                 timeout_s: float = 300.0, dtype: Optional[torch.dtype | str] = None,
                 name_map: Callable[[str], Optional[str]] = hf_name, pause_mode: Optional[str] = None,
                 in_flight: int = 2, tensor_body: str = "auto", ipc: Optional[CudaIpcTransport] = None):
        if method not in ("tensor", "distributed"):
            raise ValueError(f"rollout.sync_method must be 'tensor' or 'distributed', got {method!r}")
        if tensor_body not in ("auto", "binary", "json"):
            raise ValueError(f"tensor_body must be 'auto', 'binary' or 'json', got {tensor_body!r}")
        if bucket_mb <= 0:
            raise ValueError(f"rollout.sync_bucket_mb must be > 0, got {bucket_mb}")
        self.clients = [] if clients is None else ([clients] if isinstance(clients, RolloutClient) else list(clients))
        self.method = method
        self.bucket_bytes = int(bucket_mb * MB)
        self.backend = backend
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.engine_ranks = engine_ranks
        self.timeout_s = timeout_s
        self.dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        self.name_map = name_map
        self.pause_mode = pause_mode
        self.in_flight = max(1, in_flight)
        self.tensor_body = tensor_body
        self.ipc = ipc  # colocated SGLang: CUDA IPC handles from every rank (cuda_ipc.py)
        self._binary: Optional[list[bool]] = None  # per client: takes the raw-body update
        self._send_buffers = tensor_codec.BufferPool(keep=self.in_flight + 1)
        self._asked_dtype = False
        self._group = None
        self._sessions: list[bool] = []  # per client: updates need a weight-update session
        self._open: list[RolloutClient] = []  # clients whose session this sync opened
        self._synced = False
        if _rank() == 0 and not self.clients:
            raise ValueError("WeightSync on rank 0 needs the rollout server client(s)")

    # ---------------------------------------------------------------- the distributed group
    def connect(self) -> None:
        """Distributed method, rank 0: form the weight-update group with every server. A group
        of the same name a server still holds (from a trainer that died) is destroyed first:
        SGLang refuses to create a group whose name exists."""
        if self.method != "distributed" or _rank() != 0 or self._group is not None:
            return
        self._drop_server_groups()
        backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        address = self.master_address or _address_towards(self.clients[0].url)
        port = self.master_port or free_port(address if address != "0.0.0.0" else "127.0.0.1")
        world = 1 + self.engine_ranks * len(self.clients)
        errors: list[BaseException] = []

        def join(client: RolloutClient, offset: int):
            try:
                client.init_weights_update_group(address, port, offset, world, self.group_name, backend,
                                                 timeout_s=self.timeout_s + 30)
            except BaseException as err:  # reported below, on the caller's thread
                errors.append(err)

        threads = [threading.Thread(target=join, args=(c, 1 + i * self.engine_ranks), daemon=True)
                   for i, c in enumerate(self.clients)]
        for t in threads:
            t.start()
        try:
            group = create_group(backend, address, port, 0, world, self.group_name, self.timeout_s)
        except Exception as err:
            for t in threads:
                t.join(self.timeout_s + 60)
            refused = next((e for e in errors if isinstance(e, RolloutError) and e.refused), None)
            raise RolloutError(f"forming weight update group at {address}:{port} ({backend}, world {world}) "
                               f"failed: {err}; server side: {[str(e) for e in errors] or 'no error'}",
                               refused.status if refused else None) from None
        for t in threads:
            t.join(self.timeout_s + 60)
        if errors:
            destroy_group(group)
            raise errors[0]
        self._group = group

    def _drop_server_groups(self) -> None:
        """Ask every server to destroy its weight-update group; one it does not have, or a
        server that is gone, is no error here."""
        for c in self.clients:
            with contextlib.suppress(RolloutError):
                c.destroy_weights_update_group(self.group_name, retries=0)

    def close(self) -> None:
        """Rank 0: leave the weight-update group on both ends (servers may already be gone)."""
        if self._group is None:
            return
        self._drop_server_groups()
        destroy_group(self._group)
        self._group = None

    def reconnect(self) -> None:
        """After a server failure or restart (any rank; only rank 0 acts): destroy the group on
        every live server and here. The next `sync` forms a new one, inside its agreed steps,
        so a failure to form it raises on every rank."""
        if self.method != "distributed" or _rank() != 0:
            return
        self._drop_server_groups()
        if self._group is not None:
            destroy_group(self._group)
            self._group = None

    # ---------------------------------------------------------------- sync
    def sync(self, model: torch.nn.Module, weight_version: Optional[str] = None) -> SyncStats:
        """Send every parameter of `model` to the servers (collective: call it on all ranks);
        `weight_version` (the policy's step) names the weights once they are all in."""
        start = time.perf_counter()
        rank0 = _rank() == 0
        named = self._named_params(model)
        self._agree(self._on_rank0(self._begin) if rank0 else None)
        stats = SyncStats(0.0, 0, 0, 0)
        pending: list[tuple[Future, torch.Tensor]] = []  # tensor method: (post, its buffer), oldest first
        pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="weight-sync") if rank0 else None
        try:
            for bucket in self._buckets(named):
                failure, buf, blob = None, None, None
                with gathered([p for _, p in bucket]), torch.no_grad():
                    if self.ipc is not None:  # every rank sends a handle to its own copy
                        failure = self.ipc.send_bucket(bucket, self.clients, self.dtype, stats, self.timeout_s)
                    elif rank0:
                        try:
                            tensors = [(n, self._cast(p.data)) for n, p in bucket]
                            stats.tensors += len(tensors)
                            nbytes = _nbytes(tensors)
                            stats.bytes += nbytes
                            if self.method == "tensor" and all(_stays(p, t) for (_, p), (_, t) in zip(bucket, tensors)):
                                blob = tensor_codec.blob_parts(dict(tensors))  # sent from where they are
                            elif self.method == "tensor":  # gathered (freed at the end of the `with`) or on GPU
                                buf = self._send_buffers.acquire(max(self.bucket_bytes, nbytes) + MB)
                                blob = tensor_codec.serialize(dict(tensors), out=buf)
                                if blob.nbytes > buf.numel():  # a huge header: written elsewhere
                                    self._send_buffers.release(buf)
                                    buf = None
                            else:
                                self._broadcast_bucket(tensors)
                            del tensors
                        except Exception as err:
                            failure = err
                if rank0 and failure is None and self.method == "tensor" and self.ipc is None:
                    # At most `in_flight` buckets travel at once: the server applies one while
                    # it reads the next, and the ranks gather and serialize the one after.
                    while len(pending) >= self.in_flight and failure is None:
                        failure = self._finish(*pending.pop(0))
                    if failure is None:
                        pending.append((pool.submit(self._post_blob, blob), buf))
                    else:
                        self._send_buffers.release(buf)
                elif buf is not None:
                    self._send_buffers.release(buf)
                blob = buf = None
                self._agree(failure)
                stats.buckets += 1
            failure = None
            if rank0:
                while pending:
                    failure = self._finish(*pending.pop(0)) or failure
            self._agree(failure)
            self._agree(self._on_rank0(lambda: self._end(weight_version)) if rank0 else None)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
                for _, buf in pending:
                    self._send_buffers.release(buf)
            self._close_sessions()  # only after a failure is one still open
            if self.ipc is not None:
                self.ipc.finish()
        stats.seconds = time.perf_counter() - start
        return stats

    def _begin(self) -> None:
        """Rank 0, before the first bucket: the group, what each server takes, pause, flush, session."""
        if self.method == "distributed" and self._group is None:
            self.connect()
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

    # ---------------------------------------------------------------- pieces
    def _named_params(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        for name, p in hf_module(model).named_parameters():  # tied weights appear once
            mapped = self.name_map(name)
            if mapped is not None:
                out.append((mapped, p))
        return out

    def _buckets(self, named) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
        bucket, size = [], 0
        for name, p in named:
            # Sized by the trainer's own dtype, which every rank knows: the bucket boundaries
            # must agree across ranks, since each bucket is one collective gather.
            nbytes = full_numel(p) * p.element_size()
            if bucket and size + nbytes > self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, p))
            size += nbytes
        if bucket:
            yield bucket

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(self.dtype) if self.dtype is not None and t.dtype != self.dtype else t

    def _ask_servers(self) -> None:
        """Once: the served dtype (if the server says), which body each server takes and
        which needs a weight-update session."""
        if not self._sessions:
            self._sessions = [c.needs_weight_update_session() for c in self.clients]
        need_dtype = self.dtype is None and not self._asked_dtype
        need_body = self.method == "tensor" and self._binary is None
        if not (need_dtype or need_body):
            return
        infos = [c.model_info() for c in self.clients]
        if need_dtype:
            served = infos[0].get("dtype")
            self.dtype = parse_dtype(served) if served else None
            self._asked_dtype = True
        if need_body:
            self._binary = [self.tensor_body == "binary" or (
                self.tensor_body == "auto" and "binary" in (info.get("tensor_update_bodies") or [])) for info in infos]

    def _post_blob(self, blob):
        encoded = None
        for c, binary in zip(self.clients, self._binary):  # set by `_ask_servers` before any bucket
            if binary:
                c.update_weights_from_blob(blob, flush_cache=False)
            else:
                encoded = encoded or tensor_codec.b64encode(b"".join(blob) if isinstance(blob, list) else blob)
                c.update_weights_from_serialized([encoded], flush_cache=False)

    def _finish(self, fut: Future, buf: Optional[torch.Tensor]) -> Optional[BaseException]:
        """Wait for one bucket's post, give its buffer back; the error, if any."""
        try:
            return _result(fut)
        finally:
            self._send_buffers.release(buf)

    def _broadcast_bucket(self, tensors):
        names = [n for n, _ in tensors]
        dtypes = [dtype_name(t.dtype) for _, t in tensors]
        shapes = [list(t.shape) for _, t in tensors]
        results: list = [None] * len(self.clients)

        def announce(i: int, c: RolloutClient):
            try:
                c.update_weights_from_distributed(names, dtypes, shapes, self.group_name, flush_cache=False,
                                                  timeout_s=self.timeout_s + 30)
            except BaseException as err:
                results[i] = err

        threads = [threading.Thread(target=announce, args=(i, c), daemon=True) for i, c in enumerate(self.clients)]
        for t in threads:
            t.start()
        try:
            # Issued all at once and then waited on: the per-call overhead overlaps the transfers.
            sent = [t.contiguous() for _, t in tensors]
            for work in [dist.broadcast(t, src=0, group=self._group, async_op=True) for t in sent]:
                work.wait()
        finally:
            for t in threads:
                t.join(self.timeout_s + 60)
        errors = [r for r in results if r is not None]
        if errors:
            raise errors[0]

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


def _stays(param: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether `t` (the bucket's tensor for `param`) outlives the gather unchanged until the
    sync ends, on the CPU: then it is sent without a copy. A ZeRO-3 parameter's gathered
    data is freed when the gather ends; a cast made a tensor of its own."""
    own = not hasattr(param, "ds_id") or t.data_ptr() != param.data.data_ptr()
    return own and t.device.type == "cpu" and t.is_contiguous()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors)


def _result(fut: Optional[Future]) -> Optional[BaseException]:
    if fut is None:
        return None
    try:
        fut.result()
        return None
    except Exception as err:
        return err


def gathered(params):
    """Context in which the ZeRO-3 parameters among `params` are whole on every rank (all
    ranks must enter it); plain parameters pass through."""
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)


def _address_towards(url: str) -> str:
    """The local address the server can reach us at (loopback for a local server)."""
    host = urlparse(url).hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))  # no packet is sent; this only picks the outgoing interface
        return sock.getsockname()[0]


def sync_weights(model: torch.nn.Module, client: Optional[RolloutClient], method: str = "tensor",
                 bucket_mb: float = 256, **kwargs) -> SyncStats:
    """One-shot convenience: build a WeightSync, sync, and (distributed) leave the group."""
    ws = WeightSync(client, method, bucket_mb, **kwargs)
    try:
        return ws.sync(model)
    finally:
        ws.close()
