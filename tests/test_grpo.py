import math

import pytest
import torch

from at_core.packing import Example, pack, packed_logprobs, plan_micro_batches
from helpers import ROOT, torchrun


def test_plan_micro_batches_respects_budget():
    lengths = [50, 400, 30, 90, 500, 10, 10]
    plan = plan_micro_batches(lengths, 512)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in plan)
    assert plan_micro_batches([600], 512) == [[0]]  # too long: alone


def test_packed_logprobs_equal_unpacked(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from at_core.attention import PACKED_SDPA

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    packed_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                        attn_implementation=PACKED_SDPA).eval()
    g = torch.Generator().manual_seed(1)
    rollouts = [
        Example(prompt_ids=torch.randint(5, 300, (p,), generator=g).tolist(),
                response_ids=torch.randint(5, 300, (r,), generator=g).tolist())
        for p, r in [(7, 3), (4, 40), (11, 1), (5, 17)]
    ]
    with torch.no_grad():
        packed, _ = packed_logprobs(packed_model, pack(rollouts), temperature=0.6, chunk=16)
        dense, _ = packed_logprobs(model, pack(rollouts), temperature=0.6, chunk=16)  # block-diagonal mask path
        assert (packed - dense).abs().max().item() <= 1e-5
        for k, r in enumerate(rollouts):
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / 0.6
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]
            got = packed[pack(rollouts).seq_of_token == k]
            assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.timeout(600)
def test_gradients_same_for_1x4_and_2x2_micro_batches(tiny_model_dir, tmp_path):
    script = ROOT / "tests" / "dist" / "grad_equivalence.py"
    torchrun(script, 1, tiny_model_dir, 24, tmp_path / "one.pt")  # 1 rank x 4 micro-batches
    torchrun(script, 2, tiny_model_dir, 24, tmp_path / "two.pt")  # 2 ranks x 2 micro-batches
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["micro"] == 4 and two["micro"] == 2
    for name, g in one["grads"].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(two["grads"][name], g, atol=1e-5, rtol=0)
