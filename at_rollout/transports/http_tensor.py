"""`http_tensor`: each bucket is one `/update_weights_from_tensor` request carrying a safetensors blob.

The raw request body where the server lists "binary" in /model_info's `tensor_update_bodies`
(ours does), else base64 in SGLang's JSON body. Up to `in_flight` bucket requests travel
while the ranks gather and serialize the next bucket. A bucket whose tensors outlive the
gather unchanged on the CPU is sent from their own memory; the rest are written into one of
`in_flight + 1` bucket-sized send buffers kept from one sync to the next (fresh
multi-hundred-MB buffers cost more in page faults than the copies).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from .. import tensor_codec
from .base import SyncStats, WeightTransport, cast

MB = 1 << 20


class HttpTensorTransport(WeightTransport):
    name = "http_tensor"
    method = "tensor"
    wants_model_info = True

    def __init__(self, tensor_body: str = "auto", in_flight: int = 2, bucket_bytes: int = 256 * MB):
        if tensor_body not in ("auto", "binary", "json"):
            raise ValueError(f"tensor_body must be 'auto', 'binary' or 'json', got {tensor_body!r}")
        self.tensor_body = tensor_body
        self.in_flight = max(1, in_flight)
        self.bucket_bytes = bucket_bytes
        self._binary: Optional[list[bool]] = None  # per client: takes the raw-body update
        self._buffers = tensor_codec.BufferPool(keep=self.in_flight + 1)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: list[tuple[Future, Optional[torch.Tensor]]] = []  # (post, its buffer), oldest first
        self._next: Optional[tuple] = None  # (blob, buffer) made inside the gather

    def prepare(self, infos: list[dict]) -> None:
        if self._binary is None:
            self._binary = [self.tensor_body == "binary" or (
                self.tensor_body == "auto" and "binary" in (info.get("tensor_update_bodies") or [])) for info in infos]

    def send(self, bucket, dtype, stats: SyncStats):
        tensors = [(n, cast(p.data, dtype)) for n, p in bucket]
        stats.count(tensors)
        if all(_stays(p, t) for (_, p), (_, t) in zip(bucket, tensors)):
            self._next = (tensor_codec.blob_parts(dict(tensors)), None)  # sent from where they are
            return None
        # gathered (freed at the end of the gather) or on a GPU: into a kept buffer
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        buf = self._buffers.acquire(max(self.bucket_bytes, nbytes) + MB)
        blob = tensor_codec.serialize(dict(tensors), out=buf)
        if blob.nbytes > buf.numel():  # a huge header: written elsewhere
            self._buffers.release(buf)
            buf = None
        self._next = (blob, buf)
        return None

    def after_gather(self):
        # At most `in_flight` buckets travel at once: the server applies one while it reads
        # the next, and the ranks gather and serialize the one after.
        blob, buf = self._next
        self._next = None
        failure = None
        while len(self._pending) >= self.in_flight and failure is None:
            failure = self._wait(*self._pending.pop(0))
        if failure is not None:
            self._buffers.release(buf)
            return failure
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="weight-sync")
        self._pending.append((self._pool.submit(self._post, blob), buf))
        return None

    def drain(self):
        failure = None
        while self._pending:
            failure = self._wait(*self._pending.pop(0)) or failure
        return failure

    def finish(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for _, buf in self._pending:
            self._buffers.release(buf)
        self._pending = []
        if self._next is not None:
            self._buffers.release(self._next[1])
            self._next = None

    def _post(self, blob) -> None:
        encoded = None
        for c, binary in zip(self.clients, self._binary):  # set by `prepare` before any bucket
            if binary:
                c.update_weights_from_blob(blob, flush_cache=False)
            else:
                encoded = encoded or tensor_codec.b64encode(b"".join(blob) if isinstance(blob, list) else blob)
                c.update_weights_from_serialized([encoded], flush_cache=False)

    def _wait(self, fut: Future, buf: Optional[torch.Tensor]) -> Optional[BaseException]:
        """Wait for one bucket's post, give its buffer back; the error, if any."""
        try:
            fut.result()
            return None
        except Exception as err:
            return err
        finally:
            self._buffers.release(buf)


def _stays(param: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether `t` (the bucket's tensor for `param`) outlives the gather unchanged until the
    sync ends, on the CPU: then it is sent without a copy. A ZeRO-3 parameter's gathered
    data is freed when the gather ends; a cast made a tensor of its own."""
    own = not hasattr(param, "ds_id") or t.data_ptr() != param.data.data_ptr()
    return own and t.device.type == "cpu" and t.is_contiguous()
