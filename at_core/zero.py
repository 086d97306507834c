"""ZeRO-3 helpers for code that needs whole parameters: the weight sync, the export.

A ZeRO-3 parameter (`hasattr(p, "ds_id")`) holds only this rank's partition; gathering is a
collective, so every rank must walk the same parameters in the same buckets. Bucket sizes
therefore come from what every rank knows (the full numel and the trainer's dtype), never
from the served dtype only rank 0 has asked for.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch


def full_numel(p: torch.Tensor) -> int:
    """The parameter's whole element count, partitioned or not."""
    return int(p.ds_numel) if hasattr(p, "ds_id") else p.numel()


def gathered(params):
    """Context in which the ZeRO-3 parameters among `params` are whole on every rank (all
    ranks must enter it); plain parameters pass through."""
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)


def buckets(named, bucket_bytes: int) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """(name, parameter) pairs in runs of at most `bucket_bytes` (a bigger parameter alone),
    sized by the trainer's own dtype: the same boundaries on every rank."""
    bucket, size = [], 0
    for name, p in named:
        nbytes = full_numel(p) * p.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield bucket


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


def named_params(model: torch.nn.Module, name_map: Callable[[str], Optional[str]] = hf_name):
    """The HF model's parameters under their served names (tied weights once; None drops one)."""
    out = []
    for name, p in hf_module(model).named_parameters():
        mapped = name_map(name)
        if mapped is not None:
            out.append((mapped, p))
    return out
