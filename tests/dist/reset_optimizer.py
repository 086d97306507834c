"""A stage's `reset_optimizer` with the real ZeRO-3 engine: after a reset, the next update equals
a freshly built engine's first update from the same weights; without one it does not."""
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param
from transformers import AutoTokenizer

from at_core.actor import update_policy
from at_core.config import load_config
from at_core.engines import build_actor, init_distributed, policy_lm, reset_optimizer
from at_core.export import export_hf
from at_core.packing import Example
from world import leave_world

model_dir, work, out = sys.argv[1], sys.argv[2], sys.argv[3]
init_distributed()
cfg = load_config(overrides=["algorithm.lr=1e-3", "algorithm.entropy_coef=0.0"])


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return [Example(prompt_ids=torch.randint(5, 300, (4,), generator=g).tolist(),
                    response_ids=torch.randint(5, 300, (6,), generator=g).tolist(),
                    advantage=float(torch.randn(1, generator=g))) for _ in range(4)]


def weights(engine):
    return {n: safe_get_full_fp32_param(p).clone() for n, p in policy_lm(engine).named_parameters()}


def step(engine, seed):
    update_policy(engine, batch(seed), cfg.algorithm, temperature=1.0, max_response_len=6)


first = build_actor(model_dir, cfg)
step(first, 1)  # stage 1: AdamW's moments now hold this step
export_hf(policy_lm(first), AutoTokenizer.from_pretrained(model_dir), f"{work}/after_step1")
fresh = build_actor(f"{work}/after_step1", cfg)
step(fresh, 2)  # what a new run (the reference's next stage) does from these weights
continued = build_actor(model_dir, cfg)
step(continued, 1)
step(continued, 2)  # no reset: the moments of step 1 carry over
reset_optimizer(first)
step(first, 2)
torch.save({"reset": weights(first), "fresh": weights(fresh), "continued": weights(continued)}, out)
leave_world()
