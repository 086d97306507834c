"""Named tensors as safetensors blobs: the body of `/update_weights_from_tensor`.

Nothing here unpickles: safetensors is a JSON header plus raw little-endian bytes
(https://github.com/huggingface/safetensors, "Format"). The blob travels either base64
inside SGLang's JSON body or, to our own server, as the raw request body.

Weight sync moves the whole model every step, so both ends avoid passes over the data:
the sender writes the layout (8-byte header length, JSON header padded to 8 bytes, the
tensors' bytes back to back) into a buffer it reuses from sync to sync, one copy per
tensor; the receiver, which handles untrusted input, checks the header strictly
(`parse`) and returns views into the received bytes, which the server copies into its
weights once. Fresh multi-hundred-MB buffers cost more than the copies themselves here
(page faults), hence the reuse. `pybase64` (SIMD) is used when installed: stdlib base64
is 3-10 times slower on hundreds of MB.
"""
from __future__ import annotations

import json
import math
import struct
import warnings
from typing import Dict, Mapping, NamedTuple, Optional

import threading

import torch

try:
    import pybase64 as _b64
except ImportError:  # pragma: no cover - the slower stdlib codec works the same
    import base64 as _b64

# safetensors' dtype codes.
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {code: dtype for dtype, code in ST_DTYPES.items()}

DTYPE_NAMES = {  # SGLang's dtype strings (its /update_weights_from_distributed)
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's dtype strings: `torch.bfloat16` -> `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    key = name.removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's own limit


class CodecError(ValueError):
    """The payload is not base64, or not a well-formed safetensors blob."""


def _layout(named: Mapping[str, torch.Tensor]) -> tuple[bytes, list]:
    """The blob's prefix (length + padded JSON header) and (tensor, data offset, size) per
    tensor. Data is laid out widest element first (as safetensors itself does), so every
    tensor starts aligned to its element size and the reader can use views, not copies."""
    for name, t in named.items():
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors code")
    header, offset = {name: None for name in named}, 0  # the header keeps the caller's order
    tensors = []
    for name, t in sorted(named.items(), key=lambda kv: -kv[1].element_size()):
        t = t.detach()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        tensors.append((t, offset, size))
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to a multiple of 8 bytes
    return struct.pack("<Q", len(head)) + head, tensors


def serialize(named: Mapping[str, torch.Tensor], out: Optional[torch.Tensor] = None) -> memoryview:
    """A safetensors blob of `named` (any device), one copy per tensor.

    Written into `out` (a uint8 buffer reused between syncs, see `BufferPool`) when it is
    large enough, else into a new one; the blob is the returned view's bytes.
    """
    prefix, tensors = _layout(named)
    start = len(prefix)
    total = start + sum(size for _, _, size in tensors)
    raw = out if out is not None and out.numel() >= total else torch.empty(total, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    view[:start] = prefix
    for t, off, size in tensors:
        if size:
            dst = raw[start + off:start + off + size]
            dst.copy_(t.contiguous().reshape(-1).view(torch.uint8))  # from any device
    return view[:total]


def blob_parts(named: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """The same blob as `serialize`, as parts to send one after another: the prefix, then
    each tensor's own memory (no copy). For contiguous CPU tensors that stay unchanged
    until the parts are sent."""
    prefix, tensors = _layout(named)
    parts = [memoryview(prefix)]
    for t, _, size in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("blob_parts needs contiguous CPU tensors; use serialize()")
        if size:
            parts.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return parts


class TensorSpec(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: list
    begin: int  # byte offsets within the data region
    end: int


def header_length(first8: bytes, total: int) -> int:
    """The JSON header's length from a blob's first 8 bytes, checked against the blob's size."""
    if total < 8 or len(first8) < 8:
        raise CodecError(f"{total} bytes: too short for a safetensors header")
    (n,) = struct.unpack("<Q", bytes(first8[:8]))
    if n > min(MAX_HEADER_BYTES, total - 8):
        raise CodecError(f"header length {n} exceeds the blob ({total} bytes) or the {MAX_HEADER_BYTES}-byte limit")
    return n


def parse_header(header: bytes, data_bytes: int) -> list[TensorSpec]:
    """The tensors a safetensors header describes, in the sender's order, checked as the
    format demands: a JSON object, known dtypes, non-negative shapes whose byte size equals
    the offsets, offsets that tile the `data_bytes` of data exactly (no gap, no overlap,
    nothing past the end)."""
    try:
        header = json.loads(bytes(header))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CodecError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise CodecError("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CodecError("__metadata__ must map strings to strings")
    specs = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CodecError(f"{name}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None:
            raise CodecError(f"{name}: unknown dtype {info['dtype']!r} (known: {sorted(DTYPES)})")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise CodecError(f"{name}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CodecError(f"{name}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != size:
            raise CodecError(f"{name}: shape {shape} in {info['dtype']} needs {size} bytes, data_offsets give "
                             f"{offsets[1] - offsets[0]}")
        specs.append(TensorSpec(name, dtype, shape, offsets[0], offsets[1]))
    end = 0
    for spec in sorted(specs, key=lambda s: (s.begin, s.end)):
        if spec.begin != end:
            raise CodecError(f"{spec.name}: data_offsets start at {spec.begin}, expected {end} (tensors must tile "
                             "the data region with no gap or overlap)")
        end = spec.end
    if end != data_bytes:
        raise CodecError(f"the header describes {end} data bytes, the blob has {data_bytes}")
    return specs


def parse(blob) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors blob (bytes, bytearray, memoryview or a uint8 tensor),
    as views into it where alignment allows (copies otherwise). Checked as `parse_header`
    says; keep `blob` unchanged while the views are in use."""
    raw = _as_uint8(blob)
    total = raw.numel()
    n = header_length(raw[:8].numpy().tobytes(), total)
    start = 8 + n
    out = {}
    for spec in parse_header(raw[8:start].numpy().tobytes(), total - start):
        part = raw[start + spec.begin:start + spec.end]
        item = torch.empty((), dtype=spec.dtype).element_size()
        if part.storage_offset() % item or part.data_ptr() % item:
            part = part.clone()  # a view must be aligned to its element size
        out[spec.name] = part.view(spec.dtype).view(spec.shape)
    return out


class StreamDecoder:
    """Decodes a safetensors body as it streams in, straight into destination tensors.

    `destinations(specs)` is called once the header is complete (with the checked specs)
    and returns one contiguous CPU tensor per spec, of its dtype and shape; every later
    chunk is copied into them, so the blob never exists whole. It may raise to refuse the
    update: the rest of the body is then read and dropped (`error` holds the reason), so
    the sender gets the answer instead of a broken pipe.
    """

    def __init__(self, total: int, destinations):
        self.total = total
        self.destinations = destinations
        self.head = bytearray()
        self.n: Optional[int] = None
        self.received = 0
        self.error: Optional[Exception] = None
        self.tensors: Dict[str, torch.Tensor] = {}
        self._spans: list = []  # (data begin, data end, uint8 memoryview), by offset
        self._k = 0
        self._ready = False  # header parsed and destinations in place

    def feed(self, chunk) -> None:
        view = memoryview(chunk).cast("B")
        if self.received + len(view) > self.total:
            raise CodecError(f"the body is longer than the {self.total} bytes declared")
        while len(view) and self.error is None and not self._ready:  # the header
            need = (8 if self.n is None else 8 + self.n) - len(self.head)
            part = view[:need]
            self.head += part
            self.received += len(part)
            view = view[len(part):]
            try:
                if self.n is None and len(self.head) == 8:
                    self.n = header_length(self.head, self.total)
                if self.n is not None and len(self.head) == 8 + self.n:
                    self._start(parse_header(self.head[8:], self.total - 8 - self.n))
            except Exception as err:  # refused: the rest is read and dropped
                self.error = err
        if self.error is not None or not len(view):
            self.received += len(view)
            return
        at = self.received - 8 - self.n  # data offset of view[0]
        self.received += len(view)
        while len(view):
            begin, end, dst = self._spans[self._k]
            take = min(len(view), end - at)
            dst[at - begin:at - begin + take] = view[:take]
            view, at = view[take:], at + take
            if at == end:
                self._k += 1

    def _start(self, specs: list[TensorSpec]) -> None:
        dests = self.destinations(specs)
        self.tensors = {spec.name: dst for spec, dst in zip(specs, dests)}  # all of them, for the caller's cleanup
        for spec, dst in zip(specs, dests):
            if dst.dtype != spec.dtype or list(dst.shape) != list(spec.shape) or not dst.is_contiguous() \
                    or dst.device.type != "cpu":
                raise CodecError(f"{spec.name}: no contiguous CPU destination of its dtype and shape")
            if spec.end > spec.begin:
                self._spans.append((spec.begin, spec.end, memoryview(dst.reshape(-1).view(torch.uint8).numpy())))
        self._spans.sort(key=lambda s: s[0])
        self._ready = True

    def finish(self) -> Dict[str, torch.Tensor]:
        """The decoded tensors (sender's order); raises the refusal, or if the body fell short."""
        if self.error is not None:
            raise self.error
        if self.received != self.total or not self._ready:
            raise CodecError(f"the body ended after {self.received} of its {self.total} bytes")
        return self.tensors


class BufferPool:
    """Blob buffers (uint8 tensors) the sender reuses between weight updates: a fresh
    multi-hundred-MB buffer per update costs more in page faults than the copies into it.
    Keeps at most `keep` free buffers, the largest."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, size: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= size]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(size, dtype=torch.uint8)

    def release(self, buf: Optional[torch.Tensor]) -> None:
        if buf is None:
            return
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            del self._free[self.keep:]


def _as_uint8(blob) -> torch.Tensor:
    if isinstance(blob, torch.Tensor):
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise TypeError("parse() takes bytes or a 1-D uint8 tensor")
        return blob
    view = memoryview(blob).cast("B")
    if not len(view):
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only bytes: the views are never written to
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def b64encode(blob) -> bytes:
    return _b64.b64encode(blob)


def encode(named: Mapping[str, torch.Tensor], as_bytes: bool = False) -> str | bytes:
    """base64 of `serialize(named)`; bytes avoid a copy when the caller builds the body itself."""
    blob = b64encode(serialize(named))
    return blob if as_bytes else blob.decode("ascii")


def decode(data: str | bytes) -> Dict[str, torch.Tensor]:
    """The tensors of a base64 safetensors blob (the JSON body's form)."""
    try:
        blob = _b64.b64decode(data, validate=True)
    except (ValueError, TypeError) as err:
        raise CodecError(f"not valid base64 ({err})") from None
    return parse(blob)
