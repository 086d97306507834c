"""The served model's weights: validated, all-or-nothing updates and the receiving side of
the distributed weight-update group.

An update (one request, one bucket) is checked in full first: every name must be one of
the model's HF state-dict names, every shape and dtype must match the served tensor.
Only then is anything copied, so a rejected update leaves the served weights untouched.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, Mapping, Optional

import torch

from ..dist_group import create_group, destroy_group
from ..tensor_codec import dtype_name, parse_dtype
from .models import FieldError


class ServedWeights:
    def __init__(self, model: torch.nn.Module, lock: threading.Lock, timeout_s: float = 300.0,
                 max_bytes: Optional[int] = None):
        self.model = model
        self.lock = lock  # the generation thread's model lock
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        # state_dict keeps tied aliases (lm_head.weight and embed_tokens.weight share storage).
        self.tensors: Dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        self.device = next(model.parameters()).device
        self.groups: Dict[str, object] = {}
        # Distributed updates land in spare storage, one per weight, kept between updates: a
        # received bucket is swapped in instead of copied (one model's worth of extra memory).
        self._spares: Dict[str, torch.Tensor] = {}
        self._receive_lock = threading.Lock()
        self._claims_lock = threading.Lock()
        self._claimed: Dict[str, object] = {}  # weight -> the update landing in its spare right now
        self.version: Optional[str] = "default"  # SGLang's name for the weights it started with

    def describe(self) -> Dict[str, dict]:
        return {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype)} for k, v in self.tensors.items()}

    # ---------------------------------------------------------------- updates
    def check(self, named: Mapping[str, torch.Tensor], where: str | Mapping[str, str] = "names") -> None:
        """`where`: the request field listing the names (errors say `where[i]`), or each name's field."""
        for i, (name, t) in enumerate(named.items()):
            field = where[name] if isinstance(where, Mapping) else f"{where}[{i}]"
            target = self.tensors.get(name)
            if target is None:
                raise FieldError(field, f"unknown weight name {name!r} (the server's model has "
                                                  f"{len(self.tensors)} weights, e.g. {next(iter(self.tensors))!r})")
            if tuple(t.shape) != tuple(target.shape):
                raise FieldError(field, f"{name}: shape {list(t.shape)} does not match the served "
                                                  f"{list(target.shape)}")
            if t.dtype != target.dtype:
                raise FieldError(field, f"{name}: dtype {dtype_name(t.dtype)} does not match the served "
                                                  f"{dtype_name(target.dtype)}")

    def apply(self, named: Mapping[str, torch.Tensor], where: str | Mapping[str, str] = "names") -> int:
        """Validate everything, then copy everything (under the model lock)."""
        self.check(named, where)
        with self.lock, torch.no_grad():
            for name, t in named.items():
                self.tensors[name].copy_(t)
        return len(named)

    # ---------------------------------------------------------------- distributed
    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> None:
        if group_name in self.groups:
            raise FieldError("group_name", f"weight update group {group_name!r} already exists; destroy it first")
        if world_size < 2 or not 1 <= rank_offset < world_size:
            raise FieldError("rank_offset", f"need 1 <= rank_offset < world_size (the trainer is rank 0), got "
                                            f"rank_offset={rank_offset}, world_size={world_size}")
        if backend == "nccl" and self.device.type != "cuda":
            raise FieldError("backend", "backend 'nccl' needs a CUDA server; this one runs on "
                                        f"{self.device.type}: use 'gloo'")
        if backend not in ("gloo", "nccl"):
            raise FieldError("backend", f"backend must be gloo or nccl, got {backend!r}")
        # One server = one engine rank (no tensor parallelism here): rank = rank_offset + tp_rank 0.
        self.groups[group_name] = create_group(backend, master_address, master_port, rank_offset, world_size,
                                               group_name, self.timeout_s)

    def receive(self, names, dtypes, shapes, group_name: str, owner: object) -> Dict[str, torch.Tensor]:
        """Receive one broadcast from rank 0 per tensor, in list order (into spare storage)."""
        group = self.groups.get(group_name)
        if group is None:
            raise FieldError("group_name", f"no weight update group {group_name!r}; call /init_weights_update_group")
        if not len(names) == len(dtypes) == len(shapes):
            raise FieldError("names", f"names, dtypes and shapes differ in length "
                                      f"({len(names)}, {len(dtypes)}, {len(shapes)})")
        specs, total = [], 0
        for i, (dt, shape) in enumerate(zip(dtypes, shapes)):
            try:
                dtype = parse_dtype(dt)
            except ValueError as err:
                raise FieldError(f"dtypes[{i}]", str(err)) from None
            if any(s < 0 for s in shape):
                raise FieldError(f"shapes[{i}]", f"negative size in shape {shape}")
            specs.append((dtype, shape))
            total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.max_bytes is not None and total > self.max_bytes:
            raise FieldError("shapes", f"update of {total} bytes exceeds the limit of {self.max_bytes} bytes", 413)
        with self._receive_lock:
            received = [(name, self._landing(name, dtype, shape, owner))
                        for name, (dtype, shape) in zip(names, specs)]
            try:
                works = [torch.distributed.broadcast(buf, src=0, group=group, async_op=True) for _, buf in received]
                for work in works:  # issued at once, waited in order: per-call overhead overlaps the transfers
                    work.wait()
            except BaseException:
                self.release(names, owner)
                raise
        out = dict(received)  # checked only after receiving, so the sender never blocks on us
        if len(out) != len(received):
            raise FieldError("names", "a weight name appears twice in one update")
        return out

    def _landing(self, name: str, dtype: torch.dtype, shape, owner: object) -> torch.Tensor:
        """Where a received tensor lands: the weight's spare storage when it fits and no other
        update is landing there (claimed for `owner` until it calls `release`; `swap_in` makes
        it the weight), else a throwaway buffer."""
        target = self.tensors.get(name)
        if target is None or target.dtype != dtype or tuple(target.shape) != tuple(shape):
            return torch.empty(shape, dtype=dtype, device=self.device)
        with self._claims_lock:
            if name in self._claimed:
                return torch.empty_like(target)
            self._claimed[name] = owner
            spare = self._spares.get(name)
            if spare is None or spare.data_ptr() == target.data_ptr():
                spare = self._spares[name] = torch.empty_like(target)
            return spare

    def release(self, names, owner: object) -> None:
        """End `owner`'s claims on these weights' spares (others' claims stay)."""
        with self._claims_lock:
            for name in names:
                if self._claimed.get(name) is owner:
                    del self._claimed[name]

    def landing_for(self, specs, owner: object) -> list[torch.Tensor]:
        """Destinations for a streamed update (`tensor_codec.StreamDecoder`): checked in full
        first (a FieldError refuses it before any byte lands), then each weight's spare."""
        self.check({s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs},
                   {s.name: "body" for s in specs})
        if self.device.type != "cpu":  # received on the host; `install` copies them over
            return [torch.empty(s.shape, dtype=s.dtype) for s in specs]
        return [self._landing(s.name, s.dtype, s.shape, owner) for s in specs]

    def install(self, named: Mapping[str, torch.Tensor]) -> int:
        """Serve an update received through `landing_for`: swapped in where it landed in the
        spares (a CPU server), copied over from the host otherwise."""
        if self.device.type == "cpu":
            return self.swap_in(named)
        return self.apply(named, {name: "body" for name in named})

    def swap_in(self, named: Mapping[str, torch.Tensor]) -> int:
        """Validate everything, then make each received tensor the weight's storage (no copy);
        the old storage becomes the spare the next update lands in."""
        self.check(named, "names")
        with self.lock, torch.no_grad():
            for name, t in named.items():
                weight = self.tensors[name]
                self._spares[name] = weight.data
                weight.data = t
        return len(named)

    def destroy_group(self, group_name: str) -> None:
        group = self.groups.pop(group_name, None)
        if group is None:
            raise FieldError("group_name", f"no weight update group {group_name!r}")
        destroy_group(group)
