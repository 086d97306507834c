"""Accumulate one mini-batch's gradients with the real ZeRO-3 engine; rank 0 saves the full grads."""
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from at_core.actor import backward_mini_batch
from at_core.config import load_config
from at_core.engines import build_actor
from at_core.packing import Example
from world import leave_world

model_dir, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load_config(overrides=[f"algorithm.micro_batch_tokens={budget}", "algorithm.entropy_coef=0.01"])
engine = build_actor(model_dir, cfg)
g = torch.Generator().manual_seed(0)
rollouts = []
for i in range(8):  # every rollout is 12 tokens, so `budget` decides the micro-batch count exactly
    p = 3 + i % 4
    ids = torch.randint(5, 300, (12,), generator=g).tolist()
    rollouts.append(Example(prompt_ids=ids[:p], response_ids=ids[p:], advantage=float(torch.randn(1, generator=g))))
rank, world = dist.get_rank(), dist.get_world_size()
mine = rollouts[rank::world]
stats = backward_mini_batch(engine, mine, cfg.algorithm, temperature=0.7)
grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.lm.named_parameters()}
if rank == 0:
    torch.save({"grads": grads, "micro": len(mine) * 12 // budget}, out)
leave_world()
