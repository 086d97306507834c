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


def test_plan_micro_batches_counts_a_shared_prompt_once():
    lengths = [15, 15, 15, 15, 12]  # four rollouts of one 10-token prompt (responses of 5), another prompt
    prompts = [("a", 10)] * 4 + [("b", 10)]
    assert len(plan_micro_batches(lengths, 30)) == 3  # unshared: 15 + 15 per bin
    plan = plan_micro_batches(lengths, 30, prompts)
    assert plan == [[0, 1, 2, 3], [4]]  # 10 + 4 x 5 = 30 tokens shared


def _packed_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from at_core.attention import PACKED_SDPA

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=PACKED_SDPA)


def test_shared_prompts_give_the_unshared_logprobs_and_gradients(tiny_model_dir):
    """Each prompt once per micro-batch is an exact rewrite: the same log-probs, entropies and
    parameter gradients as packing every rollout with its own copy of the prompt."""
    model = _packed_model(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (9, 4, 13)]
    shapes = [(0, 3), (1, 40), (0, 1), (2, 17), (1, 2), (0, 25), (2, 1), (2, 60)]  # interleaved groups
    rollouts = [Example(prompt_ids=prompts[p], response_ids=torch.randint(5, 300, (r,), generator=g).tolist(),
                        advantage=float(i) - 3.5) for i, (p, r) in enumerate(shapes)]

    def run(share):
        model.zero_grad()
        batch = pack(rollouts, share_prompts=share)
        logp, ent = packed_logprobs(model, batch, temperature=0.6, with_entropy=True, chunk=16)
        adv = torch.tensor([r.advantage for r in rollouts])[batch.seq_of_token]
        ((logp * adv).sum() + ent.sum()).backward()
        return batch, logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, shared = run(False), run(True)
    assert shared[0].input_ids.shape[1] == plain[0].input_ids.shape[1] - sum(len(r.prompt_ids) for r in rollouts) + \
        sum(len(p) for p in prompts)
    assert shared[0].layout.shared and shared[0].cu_seqlens is None
    assert torch.equal(plain[0].seq_of_token, shared[0].seq_of_token)
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[2], plain[2], atol=1e-5, rtol=0)
    for name, grad in plain[3].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(shared[3][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompts_need_packed_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # plain sdpa
    rollouts = [Example(prompt_ids=[5, 6, 7], response_ids=[8, 9]), Example(prompt_ids=[5, 6, 7], response_ids=[10])]
    with pytest.raises(ValueError, match="shared prompts"):
        packed_logprobs(model, pack(rollouts, share_prompts=True))
    assert not pack(rollouts).layout.shared  # unshared by default: any attention implementation


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
