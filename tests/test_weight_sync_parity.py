"""Parity: after a ZeRO-3 optimizer step and a weight sync, the server's log-probs of its own
samples equal the trainer's recomputation (ZeRO-3 forward + at_core.logprob.token_logprobs)
to 1e-4, for both sync methods. The worker half of this file runs under torchrun (2 ranks).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 0.7
SAMPLING = {"max_new_tokens": 24, "temperature": TEMPERATURE, "top_p": 0.9, "top_k": 50, "n": 2, "sampling_seed": 11}


@pytest.mark.timeout(300)
def test_zero3_sync_parity_both_methods(tiny_model_dir, tmp_path):
    from at_rollout.backends.own_server import LocalServer
    from tests.helpers import torchrun

    out = tmp_path / "parity.json"
    with LocalServer(tiny_model_dir, log_file=tmp_path / "server.log") as server:
        torchrun(Path(__file__), 2, server.url, str(tiny_model_dir), str(out), timeout=240)
    res = json.loads(out.read_text())
    for method in ("tensor", "distributed"):
        r = res[method]
        # The optimizer step must have moved the served distribution, or the check below proves nothing.
        assert r["before_sync_max_diff"] > 1e-3, r
        assert r["after_sync_max_diff"] <= 1e-4, r
        assert r["tokens"] > 20 and r["buckets"] > 1, r


# ---------------------------------------------------------------- the torchrun worker
def _worker(url: str, model_dir: str, out_path: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from at_core.logprob import token_logprobs
    from at_core.prompts import render_prompt
    from at_rollout.client import RolloutClient
    from at_rollout.server.generator import logprob_temperature
    from at_rollout.weight_sync import WeightSync
    from transformers import AutoTokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "torch_adam": True}},
        "zero_allow_untested_optimizer": True,
    }
    hf_ds = HfDeepSpeedConfig(ds_config)  # while it lives, from_pretrained partitions under zero.Init
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    del hf_ds
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())  # really ZeRO-3 partitioned
    rank = dist.get_rank()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok.encode(render_prompt(tok, f"What is {a} + {b}?", "ellipsis")) for a, b in ((3, 4), (12, 30), (7, 7))]
    client = RolloutClient(url) if rank == 0 else None

    def train_step():
        engine.train()
        ids = torch.tensor([prompts[rank % len(prompts)]])
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    def served_vs_trainer() -> tuple[float, int]:
        samples = [client.generate(prompts, SAMPLING, return_logprob=True)] if rank == 0 else [None]
        dist.broadcast_object_list(samples, src=0)
        engine.eval()
        worst, tokens = 0.0, 0
        with torch.no_grad():
            for s in samples[0]:
                p = prompts[s.prompt_index]
                ids = torch.tensor([p + s.output_ids])
                logits = engine.module(input_ids=ids).logits[0, len(p) - 1:-1]
                mine = token_logprobs(logits, torch.tensor(s.output_ids), logprob_temperature(TEMPERATURE))
                worst = max(worst, (mine - torch.tensor(s.logprobs)).abs().max().item())
                tokens += len(s.output_ids)
        return worst, tokens

    results = {}
    for method in ("tensor", "distributed"):
        train_step()
        before, _ = served_vs_trainer()
        sync = WeightSync(client, method, bucket_mb=0.1, timeout_s=60)
        stats = sync.sync(engine.module, weight_version=method)
        after, tokens = served_vs_trainer()
        sync.close()
        results[method] = {"before_sync_max_diff": before, "after_sync_max_diff": after, "tokens": tokens,
                           "buckets": stats.buckets, "seconds": stats.seconds}
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from world import leave_world

    leave_world()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(*sys.argv[1:4])
