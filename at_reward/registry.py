"""The reward registry: a reward is a grader plus AutoThink shaping.

The trainer only calls `build_reward(cfg.reward)` and then `reward(responses, golds,
groups, lengths, **stage_shaping)`. A new domain registers a name with
`@register_reward("name")` on one of:

- a plain grading function `fn(response, gold) -> Grade | bool`: it runs in a
  `GradingPool` (bounded, crash-proof), everything else is shared;
- a `Reward` subclass overriding `grade_batch` (constructed as `cls(cfg)`);
- a factory `fn(cfg) -> Reward`.

`reward.module` names the module that does the registering: a dotted module
(`examples.mcq_reward`) or a `.py` file path.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from at_reward.autothink import base_reward, degeneration_penalty
from at_reward.grade import Grade
from at_reward.rules import Rules, rules_named
from at_reward.shaping import Shaping

__all__ = [
    "Grade", "RewardOutput", "Reward", "PooledReward", "MathReward",
    "register_reward", "build_reward", "registered_rewards", "import_reward_module",
]  # fmt: skip


@dataclass
class RewardOutput:
    rewards: list[float]  # final shaped rewards
    base: list[float]  # base reward after the degeneration penalty, before batch shaping
    think: list[bool]
    correct: list[bool]
    format_ok: list[bool]


def _cfg(cfg: Any, key: str, default: Any) -> Any:
    value = getattr(cfg, key, None) if cfg is not None else None
    return default if value is None else value


class Reward:
    """Base class: subclasses implement `grade_batch`; mode, base table, degeneration
    penalty and batch shaping are the method's and shared by every domain."""

    def __init__(self, cfg: Any = None):
        self.cfg = cfg
        self.degeneration = bool(_cfg(cfg, "degeneration_penalty", True))
        try:
            self.rules: Rules = rules_named(str(_cfg(cfg, "rules", "project")))
        except ValueError as err:
            from at_core.config import ConfigError

            raise ConfigError(str(err)) from None

    def grade_batch(self, responses: Sequence[str], golds: Sequence[Any]) -> list[Grade]:
        raise NotImplementedError(f"{type(self).__name__} must implement grade_batch(responses, golds)")

    def __call__(
        self,
        responses: Sequence[str],
        golds: Sequence[Any],
        groups: Sequence[int],
        lengths: Sequence[int],
        *,
        prompts: Optional[Sequence[str]] = None,
        shaping: Optional[Shaping] = None,
    ) -> RewardOutput:
        """Grade, score and shape one training batch.

        `responses` are the texts generated after the prompt (a no-think response starts
        with `</think>`), `golds` the stored answers, `groups` a prompt id per response
        (length shaping is per group), `lengths` response token counts. `prompts`, one per
        response, are the prompt texts the `reference` rules read with the response (decoded
        with special tokens, as the authors' code decodes them); the `project` rules ignore
        them. `shaping` is the stage's batch-level shaping (`at_reward.shaping.Shaping`;
        None: the base reward only).
        """
        if len(golds) != len(responses):
            raise ValueError(f"reward: {len(responses)} responses but {len(golds)} golds")
        if prompts is not None and len(prompts) != len(responses):
            raise ValueError(f"reward: {len(responses)} responses but {len(prompts)} prompts")
        prompts = list(prompts) if prompts is not None else [""] * len(responses)
        rules = self.rules
        grades = self.grade_batch([rules.text(p, r) for p, r in zip(prompts, responses)], list(golds))
        if len(grades) != len(responses):
            raise RuntimeError(
                f"{type(self).__name__}.grade_batch returned {len(grades)} grades for {len(responses)} responses"
            )
        think = [rules.think(p, r) for p, r in zip(prompts, responses)]
        correct = [bool(g.correct and g.format_ok) for g in grades]
        format_ok = [bool(g.format_ok) for g in grades]
        base = [base_reward(t, c, f) for t, c, f in zip(think, correct, format_ok)]
        if self.degeneration:
            base = [degeneration_penalty(b, rules.degeneration_text(p, r))
                    for b, p, r in zip(base, prompts, responses)]
        rewards = (shaping or Shaping()).apply(base, think, correct, lengths, groups)
        return RewardOutput(rewards=rewards, base=base, think=think, correct=correct, format_ok=format_ok)

    def close(self) -> None:
        """Release grading resources (worker processes)."""

    def __enter__(self) -> "Reward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PooledReward(Reward):
    """Grades with `GradingPool`: the math grader when `grader` is None, else `grader`."""

    def __init__(self, cfg: Any = None, grader: Optional[Callable] = None):
        super().__init__(cfg)
        from at_reward.pool import GradingPool

        self.pool = GradingPool(
            workers=int(_cfg(cfg, "workers", 2)), timeout_s=float(_cfg(cfg, "timeout_s", 5.0)), grader=grader,
            extract=self.rules.answer,
        )

    def grade_batch(self, responses, golds):
        return self.pool.grade_batch(list(zip(responses, golds)))

    def close(self) -> None:
        self.pool.close()


class MathReward(PooledReward):
    """The built-in "math" reward: last `\\boxed{}` after `</think>`, math-verify."""

    def __init__(self, cfg: Any = None):
        super().__init__(cfg, grader=None)


_REGISTRY: dict[str, Callable[[Any], Reward]] = {}
_ORIGIN: dict[str, str] = {}


def _origin(obj: Any) -> str:
    try:
        where = str(Path(inspect.getfile(obj)).resolve())
    except (TypeError, OSError):
        where = getattr(obj, "__module__", "?")
    return f"{getattr(obj, '__qualname__', repr(obj))} in {where}"


def register_reward(name: str) -> Callable:
    """Decorator: register a `Reward` subclass, a factory `cfg -> Reward`, or a grading
    function `(response, gold) -> Grade | bool` under `name`; returns it unchanged (a
    grading function must stay importable by name for the worker processes)."""

    def decorate(obj: Any) -> Any:
        if inspect.isclass(obj):
            if not issubclass(obj, Reward):
                raise TypeError(f"register_reward({name!r}): {obj.__name__} is not a Reward subclass")
            factory = obj
        elif callable(obj):
            params = [
                p for p in inspect.signature(obj).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]  # fmt: skip
            if len(params) == 2:
                factory = lambda cfg, _fn=obj: PooledReward(cfg, grader=_fn)  # noqa: E731
            elif len(params) == 1:
                factory = obj
            else:
                raise TypeError(
                    f"register_reward({name!r}): {obj.__qualname__} must take (response, gold) "
                    "(a grading function) or (cfg) (a factory)"
                )
        else:
            raise TypeError(f"register_reward({name!r}) needs a class or a function, got {obj!r}")
        # The same definition registered again (a module imported twice, by name and by
        # path) replaces itself; a different one under a taken name is a mistake.
        if name in _ORIGIN and _ORIGIN[name] != _origin(obj):
            raise ValueError(f"reward {name!r} is already registered by {_ORIGIN[name]}")
        _REGISTRY[name], _ORIGIN[name] = factory, _origin(obj)
        return obj

    return decorate


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def import_reward_module(spec: str) -> Any:
    """Import `spec`: a dotted module name, or a path to a .py file (module name: its stem)."""
    looks_like_path = spec.endswith(".py") or "/" in spec or "\\" in spec
    if not looks_like_path:
        try:
            return importlib.import_module(spec)
        except ImportError as err:
            raise ImportError(f"reward.module={spec!r}: cannot import it: {err}") from err
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward.module={spec!r}: no such file {path}")
    name = f"at_reward_user_{path.stem}"
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__file__", None) == str(path):
        return mod
    loader_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = mod
    try:
        loader_spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def build_reward(cfg: Any) -> Reward:
    """The reward named by `cfg.name` (the `reward` section of RunConfig), after
    importing `cfg.module` when set."""
    from at_core.config import ConfigError

    module = _cfg(cfg, "module", None)
    if module:
        try:
            import_reward_module(str(module))
        except (ImportError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from err
    name = _cfg(cfg, "name", "math")
    if name not in _REGISTRY:
        hint = "" if module else "; set reward.module to the module that registers it"
        raise ConfigError(
            f"reward.name={name!r} is not a registered reward. Registered: {', '.join(registered_rewards())}{hint}"
        )
    reward = _REGISTRY[name](cfg)
    if not isinstance(reward, Reward):
        raise TypeError(f"reward {name!r} factory returned {type(reward).__name__}, not a Reward")
    return reward


register_reward("math")(MathReward)
