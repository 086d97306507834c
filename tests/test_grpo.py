import math

import pytest
import torch

from at_core.algorithm import group_advantages, kl_penalty, policy_loss
from at_core.packing import Rollout, pack, packed_logprobs, plan_micro_batches
from helpers import ROOT, torchrun


def test_group_advantages_grpo_and_dr_grpo():
    rewards = [1.0, 0.0, 2.0, 2.0, 5.0]
    groups = [0, 0, 1, 1, 2]
    adv = group_advantages(rewards, groups)
    # group 0: mean 0.5, unbiased std sqrt(0.5)
    assert adv[0] == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6))
    assert adv[1] == pytest.approx(-0.5 / (math.sqrt(0.5) + 1e-6))
    assert adv[2] == adv[3] == 0.0  # identical rewards carry no signal
    assert adv[4] == 0.0  # a group of one
    assert group_advantages(rewards, groups, std_normalize=False)[:2] == [0.5, -0.5]


def test_clipped_loss_uses_separate_low_and_high_clip():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    terms = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.3, scale=1.0)
    # ratio 1.5, A>0: clipped at 1.3 -> -1.3; ratio 0.5, A>0: -0.5 (unclipped is larger)
    # ratio 1.5, A<0: 1.5; ratio 0.5, A<0: clipped at 0.8 -> 0.8
    assert terms.loss.item() == pytest.approx(-1.3 - 0.5 + 1.5 + 0.8, abs=1e-6)
    assert terms.stats["clip_frac"] == 2


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


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
        Rollout(prompt_ids=torch.randint(5, 300, (p,), generator=g).tolist(),
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
