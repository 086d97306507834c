"""Export the actor as an HF model directory (safetensors shards, config, tokenizer).

Under ZeRO-3 no rank holds the whole model; parameters are gathered a shard's worth at a
time and written straight out, so export never needs two full copies in memory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from at_core.zero import gathered


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def export_hf(model, tokenizer, out_dir: str | Path, shard_mb: int = 1024, dtype: torch.dtype | None = None) -> Path:
    """All ranks call this with the engine's module; rank 0 writes `out_dir`."""
    out = Path(out_dir)
    named = list(model.named_parameters())
    buckets: List[List[tuple]] = [[]]
    size = 0
    for name, p in named:
        nbytes = (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size()
        if buckets[-1] and size + nbytes > shard_mb * 2**20:
            buckets.append([])
            size = 0
        buckets[-1].append((name, p))
        size += nbytes
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    weight_map: Dict[str, str] = {}
    total = 0
    for i, bucket in enumerate(buckets):
        with gathered([p for _, p in bucket]):
            if _rank() == 0:
                tensors = {n: p.detach().to("cpu", dtype or p.dtype).clone() for n, p in bucket}
                fname = f"model-{i + 1:05d}-of-{len(buckets):05d}.safetensors"
                save_file(tensors, str(out / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in tensors})
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                del tensors
    if _rank() == 0:
        if len(buckets) == 1:
            (out / weight_map[named[0][0]]).rename(out / "model.safetensors")
        else:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = model.config
        if dtype is not None:
            config.torch_dtype = str(dtype).replace("torch.", "")
        config.use_cache = True
        config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if dist.is_initialized():
        dist.barrier()
    return out
