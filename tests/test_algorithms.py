"""Advantage estimators and loss aggregations against their formulas, worked by hand.

Expected values are arithmetic written in the test, never produced by the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from at_core.algorithms import ADVANTAGES, estimate_advantages, kl_penalty, register_advantage
from at_core.algorithms.losses import StepCounts, loss_weights, token_loss
from at_core.config import ConfigError, load_config
from at_core.packing import plan_micro_batches
from helpers import ROOT, torchrun

E = 1e-6


def algo(**kw):
    return load_config(overrides=[f"algorithm.{k}={v}" for k, v in kw.items()]).algorithm


REWARDS = [1.0, 0.0, 2.0, 2.0, 5.0, -1.0, 1.0, 0.0]
GROUPS = [0, 0, 1, 1, 2, 3, 3, 3]
LENGTHS = [10, 20, 5, 5, 7, 4, 8, 12]


def test_grpo_by_hand():
    adv = estimate_advantages(algo(), REWARDS, GROUPS, LENGTHS)
    s0 = math.sqrt(0.5)  # group 0: mean 0.5, unbiased std sqrt(0.5)
    assert adv[0] == pytest.approx(0.5 / (s0 + E)) and adv[1] == pytest.approx(-0.5 / (s0 + E))
    assert adv[2] == adv[3] == 0.0  # identical rewards: no signal
    assert adv[4] == 0.0  # a group of one, ours
    # group 3: rewards -1, 1, 0: mean 0, unbiased std 1
    assert adv[5:] == pytest.approx([-1 / (1 + E), 1 / (1 + E), 0.0])


def test_group_of_one_reference():
    adv = estimate_advantages(algo(group_of_one="reward"), REWARDS, GROUPS, LENGTHS)
    assert adv[4] == pytest.approx(5.0 / (1 + 1e-6), abs=0)  # the reference: mean 0, std 1
    assert adv[0] == pytest.approx(0.5 / (math.sqrt(0.5) + E))


def test_dr_grpo_and_rloo_by_hand():
    dr = estimate_advantages(algo(advantage="dr_grpo"), REWARDS, GROUPS, LENGTHS)
    assert dr == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0])
    loo = estimate_advantages(algo(advantage="rloo"), REWARDS, GROUPS, LENGTHS)
    # group 0: 1 - 0, 0 - 1; group 3: -1 - (1+0)/2, 1 - (-1+0)/2, 0 - (-1+1)/2
    assert loo == pytest.approx([1.0, -1.0, 0.0, 0.0, 0.0, -1.5, 1.5, 0.0])


def test_reinforce_pp_baseline_by_hand():
    adv = estimate_advantages(algo(advantage="reinforce_pp_baseline"), REWARDS, GROUPS, LENGTHS)
    centred = [0.5, -0.5, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0]
    total = sum(LENGTHS)  # 71 tokens
    mean = (0.5 * 10 - 0.5 * 20 - 1.0 * 4 + 1.0 * 8) / total  # -1 / 71
    var = sum(n * (c - mean) ** 2 for n, c in zip(LENGTHS, centred)) / (total - 1)
    assert adv == pytest.approx([(c - mean) / (math.sqrt(var) + E) for c in centred])


def test_a_new_estimator_is_one_decorated_function():
    @register_advantage("test_sign")
    def sign(rewards, groups, lengths, algo):
        return [[1.0 if r > 0 else -1.0] * n for r, n in zip(rewards, lengths)]  # token level

    try:
        adv = estimate_advantages(algo(advantage="test_sign"), [1.0, -2.0], [0, 0], [2, 3])
        assert adv == [[1.0, 1.0], [-1.0, -1.0, -1.0]]
    finally:
        del ADVANTAGES["test_sign"]


def test_unknown_algorithm_names_are_config_errors():
    for key in ("advantage", "loss_agg", "policy_loss", "group_of_one"):
        with pytest.raises(ConfigError, match=f"algorithm.{key}"):
            algo(**{key: "nope"})


def test_clipped_loss_uses_separate_low_and_high_clip():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    per_token, stats = token_loss(logp, torch.zeros(4), adv, algo(clip_low=0.2, clip_high=0.3, entropy_coef=0.0))
    # ratio 1.5, A>0: clipped at 1.3 -> -1.3; ratio 0.5, A>0: -0.5 (unclipped is larger)
    # ratio 1.5, A<0: 1.5; ratio 0.5, A<0: clipped at 0.8 -> 0.8
    assert per_token.tolist() == pytest.approx([-1.3, -0.5, 1.5, 0.8], abs=1e-6)
    assert stats["clip_frac"] == 2


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


def test_loss_weights_by_hand():
    step = StepCounts(tokens=40, sequences=5, world=2, max_response_len=16)
    lens = [3, 1]
    assert loss_weights(algo(), lens, step).tolist() == pytest.approx([2 / 40] * 4)
    assert loss_weights(algo(loss_agg="micro_batch_token_mean"), lens, step).tolist() == pytest.approx([1 / 4] * 4)
    assert loss_weights(algo(loss_agg="seq_mean_token_mean"), lens, step).tolist() == pytest.approx(
        [2 / (5 * 3)] * 3 + [2 / (5 * 1)])
    assert loss_weights(algo(loss_agg="seq_mean_token_sum_norm"), lens, step).tolist() == pytest.approx(
        [2 / (5 * 16)] * 4)


# ---------------------------------------------------------------- through the real engine

FORMS = ("token_mean", "micro_batch_token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
SHAPES = [(3, 2), (5, 19), (4, 7), (6, 1), (3, 12), (4, 4), (5, 9), (3, 30)]  # as in tests/dist/loss_forms.py


def _formula_weights(form, budget, world, cap=32):
    """Per (rollout, token) weights of the gradient, written from each form's definition."""
    resp = [r for _, r in SHAPES]
    tokens, seqs = sum(resp), len(resp)
    weights = {}
    for rank in range(world):
        mine = list(range(rank, len(SHAPES), world))
        plan = plan_micro_batches([sum(SHAPES[i]) for i in mine], budget)
        for micro in plan:
            micro_tokens = sum(resp[mine[k]] for k in micro)
            for k in micro:
                i = mine[k]
                weights[i] = {
                    "token_mean": 1 / tokens,
                    "micro_batch_token_mean": 1 / (world * micro_tokens),  # DeepSpeed averages the ranks
                    "seq_mean_token_mean": 1 / (seqs * resp[i]),
                    "seq_mean_token_sum_norm": 1 / (seqs * cap),
                }[form]
    return weights


@pytest.mark.timeout(600)
def test_loss_forms_gradients_match_their_formulas(tiny_model_dir, tmp_path):
    """Two ranks, uneven micro-batches: the engine's gradient equals the gradient of
    sum(weight x per-token loss) with each form's weights, computed densely per sequence."""
    budget = 24
    torchrun(ROOT / "tests" / "dist" / "loss_forms.py", 2, tiny_model_dir, budget, tmp_path / "g.pt", ",".join(FORMS))
    saved = torch.load(tmp_path / "g.pt")
    got = saved["grads"]
    plans = [plan_micro_batches([sum(SHAPES[i]) for i in range(r, 8, 2)], budget) for r in range(2)]
    assert any(len({sum(SHAPES[range(r, 8, 2)[k]][1] for k in m) for m in plan}) > 1
               for r, plan in enumerate(plans))  # the micro-batches really hold different token counts
    assert [(len(p), len(r)) for p, r, _ in saved["rollouts"]] == SHAPES
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    for form in FORMS:
        weights = _formula_weights(form, budget, world=2)
        model.zero_grad()
        for i, (prompt, response, advantage) in enumerate(saved["rollouts"]):
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / 0.7
            lp_all = torch.log_softmax(logits, -1)
            logp = lp_all.gather(-1, torch.tensor(response)[:, None])[:, 0]
            ent = -(lp_all.exp() * lp_all).sum(-1)
            per_token = -advantage * torch.exp(logp - logp.detach()) - 0.01 * ent  # on-policy: ratio 1
            (weights[i] * per_token).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[form][name], p.grad, atol=2e-6, rtol=1e-4, msg=lambda m: f"{form} {name}: {m}")


@pytest.mark.timeout(600)
def test_reset_optimizer_gives_a_fresh_runs_update(tiny_model_dir, tmp_path):
    torchrun(ROOT / "tests" / "dist" / "reset_optimizer.py", 1, tiny_model_dir, tmp_path, tmp_path / "w.pt")
    w = torch.load(tmp_path / "w.pt")
    for name, fresh in w["fresh"].items():
        torch.testing.assert_close(w["reset"][name], fresh, atol=1e-6, rtol=1e-5)
    assert max((w["continued"][n] - w["fresh"][n]).abs().max().item() for n in w["fresh"]) > 1e-5
