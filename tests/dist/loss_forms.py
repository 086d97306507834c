"""Each loss aggregation through the real ZeRO-3 engine on uneven micro-batches; rank 0 saves the full grads."""
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
forms = sys.argv[4].split(",")


def rollouts():
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (p, r) in enumerate([(3, 2), (5, 19), (4, 7), (6, 1), (3, 12), (4, 4), (5, 9), (3, 30)]):
        ids = torch.randint(5, 300, (p + r,), generator=g).tolist()
        out.append(Example(prompt_ids=ids[:p], response_ids=ids[p:], advantage=float(torch.randn(1, generator=g))))
    return out


saved = {}
for form in forms:
    cfg = load_config(overrides=[f"algorithm.micro_batch_tokens={budget}", "algorithm.entropy_coef=0.01",
                                 f"algorithm.loss_agg={form}"])
    engine = build_actor(model_dir, cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rollouts()[rank::world]
    backward_mini_batch(engine, mine, cfg.algorithm, temperature=0.7, max_response_len=32)
    saved[form] = {n: safe_get_full_grad(p).clone() for n, p in engine.module.lm.named_parameters()}
    del engine
if dist.get_rank() == 0:
    batch = [(r.prompt_ids, r.response_ids, r.advantage) for r in rollouts()]
    torch.save({"grads": saved, "rollouts": batch}, out)
leave_world()
