"""Named tensors as base64 safetensors: the body of `/update_weights_from_tensor`.

Nothing here unpickles: safetensors is a JSON header plus raw little-endian bytes.

Weight sync moves the whole model every step, so the sender writes the documented
safetensors layout (8-byte header length, JSON header padded to 8 bytes, the tensors'
bytes back to back) straight into one buffer, one copy per tensor, where
`safetensors.torch.save` makes several; the receiver, which handles untrusted input,
parses with the safetensors library itself. `pybase64` (SIMD) is used when installed:
stdlib base64 is 3-10 times slower on hundreds of MB.
"""
from __future__ import annotations

import json
import struct
from typing import Dict, Mapping

import numpy as np
import torch

try:
    import pybase64 as _b64
except ImportError:  # pragma: no cover - the slower stdlib codec works the same
    import base64 as _b64

# safetensors' dtype codes (https://github.com/huggingface/safetensors, format description).
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CodecError(ValueError):
    """The payload is not base64, or not a safetensors blob."""


def serialize(named: Mapping[str, torch.Tensor]) -> bytearray:
    """A safetensors blob of `named` (any device), written with one copy per tensor."""
    header, offset = {}, 0
    tensors = []
    for name, t in named.items():
        t = t.detach()
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors code")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        tensors.append((t, offset, size))
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to a multiple of 8 bytes
    start = 8 + len(head)
    buf = bytearray(start + offset)
    buf[:8] = struct.pack("<Q", len(head))
    buf[8:start] = head
    raw = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
    for t, off, size in tensors:
        if size:
            dst = raw[start + off:start + off + size]
            dst.copy_(t.contiguous().reshape(-1).view(torch.uint8))  # from any device
    return buf


def encode(named: Mapping[str, torch.Tensor], as_bytes: bool = False) -> str | bytes:
    """base64 of `serialize(named)`; bytes avoid a copy when the caller builds the body itself."""
    blob = _b64.b64encode(serialize(named))
    return blob if as_bytes else blob.decode("ascii")


def decode(data: str | bytes) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        blob = _b64.b64decode(data, validate=True)
    except (ValueError, TypeError) as err:
        raise CodecError(f"not valid base64 ({err})") from None
    try:
        return load(blob)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CodecError(f"not a safetensors blob ({err})") from None
