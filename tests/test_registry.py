"""The reward registry end to end: built-in math reward, the MCQ example by module name
and by file path, registering functions / subclasses / factories, and config errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from at_core.config import ConfigError, RunConfig, load_config
from at_reward.grade import Grade
from at_reward.shaping import Shaping
from at_reward.registry import (
    MathReward,
    Reward,
    RewardOutput,
    build_reward,
    register_reward,
    registered_rewards,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # `examples.mcq_reward` is importable from the repo root


def reward_cfg(**overrides):
    cfg = OmegaConf.structured(RunConfig).reward
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.mark.timeout(60)
def test_math_reward_end_to_end():
    responses = [
        "Let me compute.\n</think>\n\n\\boxed{4}",  # think, correct
        "Hmm.\n</think>\n\n\\boxed{5}",  # think, wrong
        "</think>\n\n\\boxed{\\frac{8}{2}}",  # no-think, correct
        "</think>\n\n\\boxed{3}",  # no-think, wrong
        "</think>\n\n" + "again " * 40 + "\\boxed{3}",  # no-think, wrong, degenerate
        "I never finish thinking",  # think, format error
    ]
    golds = ["4", "4", 4.0, ["4", "four"], "4", "4"]
    with build_reward(reward_cfg(workers=2, timeout_s=5.0)) as reward:
        assert isinstance(reward, MathReward)
        out = reward(responses, golds, groups=[0, 0, 0, 1, 1, 1], lengths=[10, 20, 30, 40, 50, 60], shaping=Shaping(balance_target=0.5))
    assert isinstance(out, RewardOutput)
    assert out.think == [True, True, False, False, False, True]
    assert out.correct == [True, False, True, False, False, False]
    assert out.format_ok == [True, True, True, True, True, False]
    # Base table, then -2 for the degenerate no-think wrong answer.
    assert out.base == [1.0, 0.0, 2.0, -1.0, -2.0, 0.0]
    # z = 3/6 = 0.5: balance does not trigger at gamma = 0.5, so rewards equal the base.
    assert out.rewards == out.base

    with build_reward(reward_cfg(workers=1, degeneration_penalty=False)) as reward:
        out = reward(responses[3:5], golds[3:5], groups=[0, 0], lengths=[1, 2], shaping=Shaping(balance_target=0.5))
    # Penalty off: both -1; all no-think, a = 1: both pulled to -2 (targets), penalty or not.
    assert out.base == [-1.0, -1.0]
    assert out.rewards == pytest.approx([-2.0, -2.0])


def test_unknown_reward_lists_registered_names():
    with pytest.raises(ConfigError) as err:
        build_reward(reward_cfg(name="chemistry"))
    assert "'chemistry'" in str(err.value) and "math" in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        build_reward(reward_cfg(name="x", module="does/not/exist.py"))
    with pytest.raises(ConfigError, match="cannot import"):
        build_reward(reward_cfg(name="x", module="no_such_module_anywhere"))


MCQ_RESPONSES = [
    "</think>\n\n\\boxed{B}",  # no-think, correct
    "Working it out...\n</think>\n\nAnswer: C",  # think, wrong
    "Working it out...\n</think>\n\n\\boxed{\\text{(D)}}",  # think, correct (one of two golds)
    "</think>\n\nno letter at all",  # no-think, format error
]
MCQ_GOLDS = ["B", "B", ["A", "D"], "A"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("module", ["examples.mcq_reward", str(REPO / "examples" / "mcq_reward.py")])
def test_mcq_example_by_module_and_by_path(module):
    with build_reward(reward_cfg(name="mcq", module=module, workers=1, timeout_s=5.0)) as reward:
        out = reward(MCQ_RESPONSES, MCQ_GOLDS, groups=[0, 0, 1, 1], lengths=[3, 9, 9, 3], shaping=Shaping(balance_target=0.5))
    assert out.correct == [True, False, True, False]
    assert out.format_ok == [True, True, True, False]
    assert out.think == [False, True, True, False]
    assert out.base == [2.0, 0.0, 1.0, 0.0]
    assert "mcq" in registered_rewards()


@pytest.mark.timeout(60)
def test_mcq_config_file_loads_and_builds():
    cfg = load_config(str(REPO / "examples" / "configs" / "mcq.yaml"))
    assert cfg.reward.name == "mcq" and cfg.reward.module == "examples.mcq_reward"
    from at_core.data import load_problems

    problems = load_problems(REPO / cfg.data.train_files[0], cfg.data.problem_key, cfg.data.answer_key)
    assert len(problems) == 10
    responses = ["</think>\n\n\\boxed{" + str(p.answer) + "}" for p in problems]
    with build_reward(cfg.reward) as reward:
        out = reward(responses, [p.answer for p in problems], list(range(10)), [5] * 10)
    assert all(out.correct)


class ConstantReward(Reward):
    """Everything is a correct think answer: exercises the subclass path in-process."""

    def grade_batch(self, responses, golds):
        return [Grade(correct=True, format_ok=True, answer=None) for _ in responses]


def test_register_subclass_and_factory():
    register_reward("test_constant")(ConstantReward)
    register_reward("test_constant")(ConstantReward)  # the same definition again is fine

    @register_reward("test_factory")
    def make(cfg):
        return ConstantReward(cfg)

    for name in ("test_constant", "test_factory"):
        reward = build_reward(reward_cfg(name=name))
        out = reward(["a", "</think>b"], [1, 2], groups=[0, 0], lengths=[1, 1])
        assert out.base == [1.0, 2.0] and out.rewards == [1.0, 2.0]
        reward.close()

    class Other(ConstantReward):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_constant")(Other)
    with pytest.raises(TypeError, match="response, gold"):
        register_reward("test_bad")(lambda a, b, c: None)
    with pytest.raises(TypeError, match="not a Reward"):
        register_reward("test_bad")(dict)


def test_reward_checks_lengths():
    reward = ConstantReward()
    with pytest.raises(ValueError, match="golds"):
        reward(["a", "b"], [1], groups=[0, 0], lengths=[1, 1])
    with pytest.raises(ValueError, match="groups"):
        reward(["a", "b"], [1, 1], groups=[0], lengths=[1, 1])
