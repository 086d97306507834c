"""Colocated weight sync into SGLang: its `/update_weights_from_tensor` payload, CUDA IPC handles.

When the engine shares GPUs with the trainer, the weights need not travel at all: each
trainer rank flattens a bucket of (gathered) parameters into one uint8 tensor on its GPU and
sends only a CUDA IPC handle to it; SGLang's TP rank on that GPU maps the memory and copies
from it. The request SGLang 0.5.15.post1-0.5.23 takes (`UpdateWeightsFromTensorReqInput`):

    {"serialized_named_tensors": [one entry per engine TP rank], "load_format": "flattened_bucket",
     "flush_cache": false}

(the sync pauses, flushes and opens the weight-update session around the buckets, and names
the weights' version once all are in: `at_rollout/weight_sync.py`).

Each entry is what SGLang's `MultiprocessingSerializer.serialize(obj, output_str=True)` makes
(`ForkingPickler` with torch's multiprocessing reductions, then base64) of
`{"flattened_tensor": uint8 tensor, "metadata": [FlattenedTensorMetadata, ...]}`; TP rank i
decodes only entry i (`tp_worker.deserialize_own_rank`), so entry i must hold the handle of the
copy on TP rank i's GPU. The device travels as the GPU's UUID, as SGLang's
`patch_torch._reduce_tensor_modified` sends it, so the engine finds the GPU whatever its
CUDA_VISIBLE_DEVICES numbering. SGLang is not needed here: the metadata class is pickled under
SGLang's own name (`sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata`), which its
`SafeUnpickler` allows in every supported version.

Sending such a payload is the client's business; our own server never unpickles anything from
the network. `decode()` below is SGLang's side written from its definitions, for the GPU check
and the tests (a second process rebuilding the payload), never for a server.
"""
from __future__ import annotations

import base64
import contextlib
import io
import pickle
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing  # registers torch's reductions on ForkingPickler
from multiprocessing.reduction import ForkingPickler
from torch.multiprocessing import reductions

from .base import WeightTransport, cast

LOAD_FORMAT = "flattened_bucket"
SGLANG_BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"
_DEVICE_ARG = 6  # rebuild_cuda_tensor's storage_device argument (SGLang's _REDUCE_TENSOR_ARG_DEVICE_INDEX)
_strategy_lock = threading.Lock()


@dataclass
class FlattenedTensorMetadata:
    """One tensor's place in a bucket, field for field SGLang's class of this name (byte offsets)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int  # bytes, as SGLang counts them (numel of the uint8 view)


def flatten(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[FlattenedTensorMetadata]]:
    """One new uint8 tensor holding every tensor's bytes in order, and where each one lies.

    Always a fresh tensor: SGLang answers after it has queued its copies, not after they ran,
    so a buffer reused for the next bucket could be overwritten while it is still being read.
    """
    if not named:
        raise ValueError("cannot flatten an empty bucket")
    parts, meta, offset = [], [], 0
    for name, t in named:
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if offset % t.element_size():
            raise ValueError(f"{name}: byte offset {offset} is not a multiple of its dtype's size ({t.dtype}); "
                             "a bucket holds one dtype")
        meta.append(FlattenedTensorMetadata(name, t.shape, t.dtype, offset, offset + flat.numel(), flat.numel()))
        parts.append(flat)
        offset += flat.numel()
    return torch.cat(parts), meta


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_tensor(t: torch.Tensor):
    """torch's reduction, with a CUDA tensor's device sent as its UUID (as SGLang's patched one does)."""
    fn, args = reductions.reduce_tensor(t)
    if t.is_cuda:
        args = (*args[:_DEVICE_ARG], _device_uuid(args[_DEVICE_ARG]), *args[_DEVICE_ARG + 1:])
    return fn, args


class _Pickler(pickle._Pickler):
    """ForkingPickler's reduction table (torch's tensor and storage reductions) in the Python
    pickler, which lets `FlattenedTensorMetadata` be written under SGLang's module name: the C
    pickler insists that a class's module be importable here, and SGLang is not installed."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.DEFAULT_PROTOCOL)  # what ForkingPickler(buf).dump uses
        if self.proto < 4:
            raise RuntimeError(f"pickle protocol {self.proto} < 4: STACK_GLOBAL is needed")
        table = ForkingPickler._copyreg_dispatch_table.copy()
        table.update(ForkingPickler._extra_reducers)
        table[torch.Tensor] = table[torch.nn.Parameter] = _reduce_tensor
        self.dispatch_table = table

    def save_global(self, obj, name=None):
        if obj is FlattenedTensorMetadata:
            self.save(SGLANG_BUCKET_MODULE)
            self.save("FlattenedTensorMetadata")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def serialize(flat: torch.Tensor, meta: Sequence[FlattenedTensorMetadata]) -> str:
    """One `serialized_named_tensors` entry: base64 of the pickled bucket dict.

    A CUDA tensor becomes an IPC handle. A CPU tensor (tests, CPU rehearsals) becomes a
    shared-memory file name (torch's `file_system` strategy for this call), which any process
    of the same host can open; the default file-descriptor strategy would need our process's
    authkey."""
    buf = io.BytesIO()
    obj = {"flattened_tensor": flat, "metadata": list(meta)}
    with _strategy_lock, (_file_system_sharing() if not flat.is_cuda else contextlib.nullcontext()):
        _Pickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@contextlib.contextmanager
def _file_system_sharing():
    old = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch.multiprocessing.set_sharing_strategy(old)


def request_body(entries: Sequence[str], weight_version: Optional[str] = None, flush_cache: bool = False) -> dict:
    """The JSON body of one `/update_weights_from_tensor` bucket (entry i for TP rank i)."""
    body: dict[str, Any] = {"serialized_named_tensors": list(entries), "load_format": LOAD_FORMAT,
                            "flush_cache": flush_cache}
    if weight_version is not None:
        body["weight_version"] = weight_version
    return body


# ---------------------------------------------------------------- SGLang's side (GPU check, tests)

# The globals a payload of ours may name: SGLang 0.5.23's SafeUnpickler allows each of them
# (the tests check this list against every supported wheel).
DECODE_GLOBALS = {
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_fd"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch", "UntypedStorage"),
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch", "uint8"),
    ("torch", "bfloat16"),
    ("torch", "float16"),
    ("torch", "float32"),
    ("copyreg", "__newobj__"),
    ("multiprocessing.resource_sharer", "DupFd"),
    (SGLANG_BUCKET_MODULE, "FlattenedTensorMetadata"),
}


class _SGLangUnpickler(pickle.Unpickler):
    """SGLang's decode: an allow-list unpickler; its metadata class resolved to ours; a CUDA
    storage's device read as a UUID (`patch_torch._rebuild_cuda_tensor_modified`)."""

    def find_class(self, module, name):
        if (module, name) not in DECODE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weight payload")
        if (module, name) == (SGLANG_BUCKET_MODULE, "FlattenedTensorMetadata"):
            return FlattenedTensorMetadata
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return _rebuild_cuda_tensor
        return super().find_class(module, name)


def _rebuild_cuda_tensor(*args):
    device = args[_DEVICE_ARG]
    if isinstance(device, str):
        matches = [i for i in range(torch.cuda.device_count()) if _device_uuid(i) == device]
        if not matches:
            raise RuntimeError(f"no visible GPU has UUID {device}: the engine must see the trainer's GPU")
        device = matches[0]
    return reductions.rebuild_cuda_tensor(*args[:_DEVICE_ARG], device, *args[_DEVICE_ARG + 1:])


def decode(entry: str) -> list[tuple[str, torch.Tensor]]:
    """One entry back to (name, tensor) views, as SGLang's `MultiprocessingSerializer.deserialize`
    and `FlattenedTensorBucket.reconstruct_tensors` do it (call it in another process than the sender)."""
    obj = _SGLangUnpickler(io.BytesIO(base64.b64decode(entry, validate=True))).load()
    flat = obj["flattened_tensor"]
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in obj["metadata"]]


# ---------------------------------------------------------------- the transport, every rank


@dataclass(frozen=True)
class EnginePlacement:
    """One engine's GPUs: `node` (index in rank order) and its TP ranks' local GPU indices."""

    node: int
    gpus: tuple[int, ...]


class CudaIpcTransport(WeightTransport):
    """Bucket by bucket, on every rank: flatten, serialize, gather the handles on rank 0, which
    posts one request per engine with entry i from the rank on that engine's i-th GPU.

    `placements[e]` is where engine `e` (rank 0's `clients[e]`) runs. Ranks that hold none of
    an engine's GPUs take part in the gather with nothing to send. The last `keep` buckets stay
    referenced (see `flatten`), the rest are freed once rank 0 has its answers.
    """

    name = "cuda_ipc"
    method = "tensor"
    every_rank = True

    def __init__(self, placements: Sequence[EnginePlacement], keep: int = 2):
        self.placements = list(placements)
        self._keep: deque = deque(maxlen=max(1, keep))
        self._sources: Optional[list[list[int]]] = None  # per engine: the global rank of each TP rank's GPU
        self._dtype: Optional[torch.dtype] = None
        self._dtype_known = False

    def _rank_map(self) -> list[list[int]]:
        """Each engine's source ranks, from every rank's (host, local device), gathered once."""
        if self._sources is not None:
            return self._sources
        import socket

        me = (socket.gethostname(), _local_device())
        ranks = [me]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, me)
        hosts: list[str] = []
        for host, _ in ranks:
            if host not in hosts:
                hosts.append(host)
        where = {(hosts.index(h), d): r for r, (h, d) in enumerate(ranks)}
        sources = []
        for e, p in enumerate(self.placements):
            missing = [g for g in p.gpus if (p.node, g) not in where]
            if missing:
                raise ValueError(f"engine {e} is placed on node {p.node} GPUs {list(p.gpus)}, but no trainer rank "
                                 f"runs on GPU(s) {missing} there (nodes seen: {len(hosts)}): a colocated engine "
                                 "needs a trainer rank on each of its GPUs (rollout.base_gpu_id, rollout.tp_size)")
            sources.append([where[(p.node, g)] for g in p.gpus])
        self._sources = sources
        return sources

    def send(self, bucket: Sequence[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype] = None,
             stats: Any = None) -> Optional[BaseException]:
        """Collective: every rank passes its gathered bucket of (name, parameter); rank 0's `dtype`
        (the served one; None: the trainer's own) is what every rank casts to. Rank 0 gets the
        engines' verdict (an error, or None); the other ranks get None."""
        sources = self._rank_map()
        rank, world = _rank_world()
        if not self._dtype_known:
            box = [str(dtype).replace("torch.", "") if dtype is not None else ""]
            if world > 1:
                dist.broadcast_object_list(box, src=0)
            self._dtype, self._dtype_known = (getattr(torch, box[0]) if box[0] else None), True
        entry, error = None, None
        if any(rank in s for s in sources):
            try:
                named = [(n, cast(p.data, self._dtype)) for n, p in bucket]
                flat, meta = flatten(named)
                if flat.is_cuda:
                    torch.cuda.current_stream().synchronize()  # the copy is done before anyone maps it
                self._keep.append(flat)
                entry = serialize(flat, meta)
                if stats is not None and rank == 0:
                    stats.tensors += len(meta)
                    stats.bytes += flat.numel()
            except Exception as err:  # reported through rank 0 below
                error = f"rank {rank}: {type(err).__name__}: {err}"
        gathered = [(entry, error)]
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object((entry, error), gathered, dst=0)
        if rank != 0:
            return None
        errors = [e for _, e in gathered if e]
        if errors:
            return RuntimeError("; ".join(errors))
        return _post_all(self.clients, [[gathered[r][0] for r in s] for s in sources], self.timeout_s)

    def finish(self) -> None:
        """After the sync: drop the kept buckets and let torch free blocks the engines released."""
        self._keep.clear()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()


def _local_device() -> int:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _post_all(clients, entries_per_engine, timeout_s) -> Optional[BaseException]:
    """One request per engine, in parallel; the first failure (a RolloutError), or None."""
    from concurrent.futures import ThreadPoolExecutor

    from ..client import RolloutError

    def post(i):
        c = clients[i]
        try:
            out = c.request("POST", "/update_weights_from_tensor", request_body(entries_per_engine[i]),
                            timeout_s=timeout_s, retries=0).json()
        except RolloutError as err:
            return err
        except Exception as err:
            return RolloutError(f"{c.url}: {type(err).__name__}: {err}")
        if isinstance(out, dict) and out.get("success") is False:
            return RolloutError(f"{c.url}/update_weights_from_tensor: {out.get('message')}")
        return None

    if len(clients) != len(entries_per_engine):
        return RolloutError(f"{len(clients)} rollout clients for {len(entries_per_engine)} placed engines")
    with ThreadPoolExecutor(max_workers=max(1, len(clients))) as pool:
        results = list(pool.map(post, range(len(clients))))
    return next((r for r in results if r is not None), None)
