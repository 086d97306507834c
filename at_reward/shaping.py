"""A stage's batch-level reward shaping as one object, from the config to the reward.

`Shaping` is both the `stage.N.shaping` config schema and what `Reward.__call__` receives,
so a new knob is one field here and its use in `apply`; nothing in between threads it by
name. The formulas live in `at_reward.autothink` (docs/method.md, "Rewards").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from at_reward.autothink import batch_balance, length_shaping


@dataclass
class Shaping:
    balance_target: Optional[float] = None  # gamma of batch_balance; None (or >= 1): off
    balance_slope: float = 2.0  # lambda of batch_balance
    length_alpha: float = 0.0  # length_shaping of correct responses; 0: off
    length_beta: float = 0.0  # length_shaping of wrong responses; 0: off

    @property
    def balance_on(self) -> bool:
        return self.balance_target is not None and self.balance_target < 1.0

    def apply(self, base: Sequence[float], think: Sequence[bool], correct: Sequence[bool],
              lengths: Sequence[float], groups: Sequence[int]) -> list[float]:
        """Length shaping per prompt group, then batch balance over the whole batch (the
        reference code's order)."""
        n = len(base)
        for name, seq in (("think", think), ("correct", correct), ("lengths", lengths), ("groups", groups)):
            if len(seq) != n:
                raise ValueError(f"shaping: {name} has {len(seq)} entries, base has {n}")
        rewards = length_shaping(base, correct, lengths, groups, self.length_alpha, self.length_beta)
        if self.balance_on:
            rewards = batch_balance(rewards, think, correct, self.balance_target, self.balance_slope)
        return rewards

    def describe(self) -> str:
        parts = []
        if self.balance_on:
            parts.append(f"batch_balance target {self.balance_target} slope {self.balance_slope}")
        if self.length_alpha or self.length_beta:
            parts.append(f"length_shaping alpha {self.length_alpha} beta {self.length_beta}")
        return ", ".join(parts) or "base reward only"
