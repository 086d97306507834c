"""The training prompt stream: a reproducible, resumable order over the training problems.

Epoch e is a permutation seeded by (seed, e); the stream's only state is how many prompts
it has handed out, so a checkpoint stores one integer and a resumed run sees exactly the
same prompts in the same order.
"""
from __future__ import annotations

import random
from typing import List, Sequence

from at_core.data import Problem


class PromptStream:
    def __init__(self, problems: Sequence[Problem], seed: int = 0, shuffle: bool = True, position: int = 0):
        if not problems:
            raise ValueError("the training set is empty")
        self.problems = list(problems)
        self.seed = seed
        self.shuffle = shuffle
        self.position = position
        self._epoch = -1
        self._order: List[int] = []

    def _order_for(self, epoch: int) -> List[int]:
        if epoch != self._epoch:
            self._order = list(range(len(self.problems)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order

    def start_epoch(self) -> None:
        """Skip to the start of the next epoch (a no-op at an epoch's start): what follows is a
        fresh permutation, as a new data loader would give."""
        self.position = -(-self.position // len(self.problems)) * len(self.problems)

    def take(self, n: int) -> List[Problem]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.problems))
            out.append(self.problems[self._order_for(epoch)[i]])
            self.position += 1
        return out
