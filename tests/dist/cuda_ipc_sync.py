"""Two CPU ranks sync a ZeRO-3 partitioned model into one 2-GPU (TP 2) engine over the
CUDA-IPC transport's code path: each bucket is gathered on both ranks and rank r's copy is
entry r of each request (CPU shared memory standing in for CUDA IPC). argv: the stand-in's
URL, the output JSON."""
import hashlib
import json
import sys

import torch
import torch.distributed as dist

from at_rollout.client import RolloutClient, RolloutError
from at_rollout.transports.cuda_ipc import CudaIpcTransport, EnginePlacement
from at_rollout.weight_sync import WeightSync
from world import leave_world


def sha(t):
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def main():
    url, out = sys.argv[1], sys.argv[2]
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    expected = {n: {"dtype": "torch.bfloat16", "shape": list(p.shape), "sha256": sha(p.to(torch.bfloat16))}
                for n, p in plain.named_parameters()}
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
                 "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=plain, model_parameters=plain.parameters(), config=ds_config)
    model = engine.module
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())  # partitioned, nothing local
    clients = [RolloutClient(url, retries=0)] if rank == 0 else None
    ws = WeightSync(clients, CudaIpcTransport([EnginePlacement(0, (0, 1))]), bucket_mb=0.002, dtype="bfloat16")
    stats = ws.sync(model, weight_version="7")
    result = {"buckets": stats.buckets, "tensors": stats.tensors, "bytes": stats.bytes, "expected": expected}
    # an engine on a GPU no rank holds: the same ValueError on every rank, before any request
    bad = WeightSync(clients, CudaIpcTransport([EnginePlacement(0, (1, 2))]), bucket_mb=1)
    try:
        bad.sync(model)
        result["bad"] = "no error"
    except (ValueError, RolloutError) as err:
        result["bad"] = str(err)
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, result["bad"])
    result["bad_per_rank"] = box
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    leave_world()


if __name__ == "__main__":
    main()
