"""The tiny world's task: integer arithmetic in three difficulty tiers.

The tiers are built around what a ~1M-parameter model can do in one forward pass per
answer digit, because AutoThink only has something to learn where that differs by tier:

- easy: single-digit addition (`7 + 5`): one recalled fact.
- medium: the multiplication table (`7 * 8`, factors 2..9): one recalled fact, a
  different operation and wording from easy.
- hard: a three-digit number (digits 1..9) times a one-digit number (`347 * 6`): a
  four-digit product with a chain of carries, which a tiny model cannot produce in one
  shot, yet computes through a written trace made only of medium and easy steps
  (`7*6=42`, `4*6=24`, `24+4=28`, ...; see `teacher.py`).

The one-shot skills the no-think mode needs on easy and medium problems (the addition and
multiplication tables) are ones the hard trace practises at every step.

The tier is visible in the text (the operation words and the number of digits), so a
policy can learn to think on hard problems only. Problems are worded with a few
templates, from bare equations to short word problems, as in real math sets.

Splits never overlap. A problem is held out ("test") when a hash of its split key falls
in the held-out fifth: for hard problems the key is the pair of factors, so a held-out
product was never seen in training under any wording or order (one-shot accuracy on
hard cannot come from memorised products); easy and medium are recall tiers by design
(the tables are small), and are held out by wording (the full problem text).
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from at_core.data import Problem

TIERS = ("easy", "medium", "hard")
SPLITS = ("train", "test")
HELD_OUT_BUCKETS = 5  # one bucket in five is held out

NAMES = ("Tom", "Anna", "Maya", "Leo", "Sara", "Ben", "Nina", "Omar")
ITEMS = ("apples", "marbles", "stickers", "coins", "pencils", "books", "cookies", "cards")

# {a}, {b} are the operands in order; {name}, {item} fill word problems.
TEMPLATES = {
    "+": (
        "What is {a} plus {b}?",
        "Compute ${a} + {b}$.",
        "Find the sum of {a} and {b}.",
        "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
    ),
    "*": (
        "What is {a} times {b}?",
        "Compute ${a} \\times {b}$.",
        "Find the product of {a} and {b}.",
        "{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?",
    ),
}
# Words that name the operation in each template family (used by `parse`).
_OP_CUES = (
    ("+", re.compile(r"\bplus\b| \+ |\bsum\b|\bmore\b")),
    ("*", re.compile(r"\btimes\b|\\times|\bproduct\b|\beach box\b")),
)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Arithmetic:
    """What a problem asks: `a op b`."""

    op: str
    a: int
    b: int

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a * self.b

    @property
    def tier(self) -> str:
        if self.op == "+":
            return "easy"
        return "medium" if max(self.a, self.b) < 10 else "hard"


def parse(text: str) -> Arithmetic:
    """The arithmetic a generated problem asks for (its operation and operands, in order)."""
    ops = [op for op, cue in _OP_CUES if cue.search(text)]
    numbers = [int(n) for n in _NUMBER.findall(text)]
    if len(ops) != 1 or len(numbers) != 2:
        raise ValueError(f"not a tiny-task problem (expected one operation and two numbers): {text!r}")
    return Arithmetic(ops[0], numbers[0], numbers[1])


def tier_of(text: str) -> str:
    """The difficulty tier of a problem, read from its text alone."""
    return parse(text).tier


def _draw(tier: str, rng: random.Random) -> Arithmetic:
    if tier == "easy":
        return Arithmetic("+", rng.randint(1, 9), rng.randint(1, 9))
    if tier == "medium":
        return Arithmetic("*", rng.randint(2, 9), rng.randint(2, 9))
    if tier == "hard":
        big = int("".join(str(rng.randint(1, 9)) for _ in range(3)))
        small = rng.randint(2, 9)
        return Arithmetic("*", big, small) if rng.random() < 0.5 else Arithmetic("*", small, big)
    raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")


def _word(arith: Arithmetic, rng: random.Random) -> str:
    template = rng.choice(TEMPLATES[arith.op])
    return template.format(a=arith.a, b=arith.b, name=rng.choice(NAMES), item=rng.choice(ITEMS))


def split_key(text: str) -> str:
    """What decides a problem's split: its factor pair for hard problems, else its text."""
    arith = parse(text)
    if arith.tier == "hard":
        return f"hard:{min(arith.a, arith.b)}*{max(arith.a, arith.b)}"
    return text


def split_of(text: str) -> str:
    digest = hashlib.sha256(split_key(text).encode()).digest()
    return "test" if digest[0] % HELD_OUT_BUCKETS == 0 else "train"


def generate(tier: str, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """`n` problems of `tier` from `split`, reproducible from `seed`.

    Training problems may repeat (the easy and medium tables are small); held-out
    problems are distinct, so an evaluation never counts the same problem twice.
    """
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"tiny-task:{tier}:{split}:{seed}")
    unique = split != "train"
    seen: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct {split} problems for tier {tier!r}")
        arith = _draw(tier, rng)
        text = _word(arith, rng)
        if split_of(text) != split or (unique and text in seen):
            continue
        seen.add(text)
        out.append(Problem(text, arith.value, tier=tier, source=f"tiny-{tier}-{split}", index=len(out)))
    return out


def generate_all(n_per_tier: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """Equal numbers of every tier, interleaved easy, medium, hard, easy, ..."""
    per_tier = [generate(t, n_per_tier, seed, split) for t in TIERS]
    return [p for group in zip(*per_tier) for p in group]
