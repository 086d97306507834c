"""Run configuration: an OmegaConf structured schema, YAML files and dotted CLI overrides.

Every knob of a run lives in one tree of dataclasses so that a mistyped key or a wrong
type is caught before any work starts, and the resolved tree is written next to the
results (`config.yaml`) so a run can always be reproduced.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from at_reward.shaping import Shaping


class ConfigError(ValueError):
    """A user-facing configuration mistake (unknown key, wrong type, bad value)."""


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory; empty means the tiny built-in model (built on demand)
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on GPU; or fp32 | bf16
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    train_files: List[str] = field(default_factory=list)  # empty: the tiny arithmetic task
    eval_files: List[str] = field(default_factory=list)
    problem_key: str = "problem"
    answer_key: str = "answer"
    answer_extract: Optional[str] = None  # e.g. "after_hashes" for GSM8K's `#### 42`
    tier_key: Optional[str] = "tier"  # a per-row difficulty label, reported in metrics
    long_prompts: str = "truncate"  # longer than max_prompt_len: truncate (keep the tail) | drop (the reference)
    tiny_train_size: int = 20000  # problems generated per tier for the tiny task
    tiny_eval_size: int = 200  # held-out problems per tier for the tiny task
    shuffle: bool = True


@dataclass
class RewardConfig:
    name: str = "math"  # a name in at_reward.registry
    module: Optional[str] = None  # import path of a user module that registers `name`
    workers: int = 2  # grading processes
    timeout_s: float = 5.0  # wall-clock limit per graded response
    degeneration_penalty: bool = True
    rules: str = "project"  # project | reference: how mode, answer and degeneration are read (docs/method.md)


@dataclass
class StageConfig:
    """One AutoThink stage: its reward shaping and its rollout/batch shape."""

    steps: int = 0
    prompts_per_step: int = 128
    rollouts_per_prompt: int = 8
    max_response_len: int = 8192
    prompt_style: str = "ellipsis"  # standard | ellipsis | no_think
    shaping: Shaping = field(default_factory=Shaping)  # batch_balance and length_shaping (at_reward.shaping)
    temperature: float = 0.6
    top_p: float = 1.0
    lr: Optional[float] = None  # overrides algorithm.lr for this stage
    reset_optimizer: bool = False  # fresh AdamW state at the stage's start (the reference: one run per stage)
    reshuffle: bool = False  # start the stage on a fresh permutation of the training data


def _paper_stages() -> Dict[str, StageConfig]:
    return {
        "1": StageConfig(steps=220, prompts_per_step=128, max_response_len=8192, shaping=Shaping(balance_target=0.5)),
        "2": StageConfig(steps=440, prompts_per_step=64, max_response_len=16384),
        "3": StageConfig(
            steps=130, prompts_per_step=64, max_response_len=24576,
            shaping=Shaping(length_alpha=0.05, length_beta=0.05),
        ),
    }


@dataclass
class AlgorithmConfig:
    """GRPO with a token-level clipped surrogate (docs/method.md, "Training recipe").

    `advantage`, `policy_loss` and `loss_agg` name functions registered in
    `at_core.algorithms`; `group_of_one` is what a prompt with a single response gets.
    """

    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp_baseline | any registered estimator
    group_of_one: str = "zero"  # zero | reward (the reference: r / (1 + 1e-6))
    policy_loss: str = "clipped"
    loss_agg: str = "token_mean"  # token_mean | micro_batch_token_mean (the reference) | seq_mean_token_mean | seq_mean_token_sum_norm
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"  # k1 | k3 | low_var_kl
    entropy_coef: float = 0.001
    ppo_epochs: int = 1
    mini_batch_prompts: Optional[int] = None  # prompts per optimizer step; None: one step per RL step
    micro_batch_tokens: int = 32768  # token budget of one packed micro-batch
    share_prompts: bool = True  # a micro-batch computes each prompt once for all its rollouts (packed SDPA only)
    logprob_chunk: int = 4096  # rows per chunk in the fused log-prob pass


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed config as is


@dataclass
class ClusterConfig:
    """The hardware a recipe is planned for (read by the planner and `--dry-run`, not by launchers)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    cpu_mem_gb: Optional[float] = None  # per node; None: not checked


@dataclass
class RolloutConfig:
    backend: str = "server"  # server: the project's own server; sglang: launch SGLang
    urls: List[str] = field(default_factory=list)  # already-running servers (skip launching)
    # Engines rank 0 launches (our server): data parallel over prompt groups, on this machine.
    # 0: one single-threaded engine per torch thread of the trainer (CPU runs, docs/rollout.md).
    engines: int = 1
    engine_threads: int = 0  # torch threads per launched engine; 0: the trainer's threads / engines
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    api_key: Optional[str] = None
    sync_method: str = "tensor"  # tensor | distributed
    sync_bucket_mb: int = 256
    tp_size: int = 1
    mem_fraction: float = 0.6
    colocate: bool = False  # release SGLang memory during the update, resume after
    base_gpu_id: Optional[int] = None  # the launched engine's first GPU; None: 0 colocated, after the trainer's apart
    router_url: Optional[str] = None  # an sglang-router in front of the engines: generation goes through it
    groups_per_request: int = 0  # prompt groups per /generate; 0: 1 for SGLang, an engine's share for ours (dispatch.py)
    max_in_flight_groups: int = 32  # per engine; more wait, then go to whichever engine frees up first
    request_timeout_s: float = 600.0
    retries: int = 3
    startup_timeout_s: float = 300.0


@dataclass
class EvalConfig:
    every: int = 0  # steps between in-training evaluations; 0: only at stage ends
    samples: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_response_len: int = 32768


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    stage: Dict[str, StageConfig] = field(default_factory=_paper_stages)
    start_stage: int = 1
    out_dir: str = "runs/autothink"
    seed: int = 0
    save_every: int = 50  # steps between checkpoints; 0: only at stage ends
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # None | auto | a checkpoint directory
    max_prompt_len: int = 1024


def _describe(schema: Any, dotted: str) -> tuple[str, list[str], Any]:
    """Walk `dotted` down the dataclass schema; return (prefix, valid keys there, expected type)."""
    node: Any = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(node):
            hints = typing.get_type_hints(node)
            if part not in hints:
                return ".".join(parts[:i]), sorted(hints), None
            node = hints[part]
        else:
            origin = typing.get_origin(node)
            args = typing.get_args(node)
            if origin is dict:
                node = args[1]
            elif origin is list:
                node = args[0]
            elif origin is typing.Union:
                non_none = [a for a in args if a is not type(None)]
                node = non_none[0] if non_none else node
                return _describe(node, ".".join(parts[i:])) if dataclasses.is_dataclass(node) else ("", [], node)
            else:
                return ".".join(parts[:i]), [], node
    return dotted, sorted(typing.get_type_hints(node)) if dataclasses.is_dataclass(node) else [], node


def _type_name(tp: Any) -> str:
    if tp is None:
        return "unknown"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _friendly(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        missing = str(err).split("'")[1] if "'" in str(err) else key
        full = key or missing
        prefix, valid, _ = _describe(RunConfig, full)
        where = prefix or "<top level>"
        return ConfigError(
            f"{source}: unknown config key '{full}'. Valid keys under {where}: {', '.join(valid)}"
        )
    if isinstance(err, ValidationError):
        _, _, tp = _describe(RunConfig, key)
        return ConfigError(f"{source}: config key '{key}' expects {_type_name(tp)}: {err.msg.splitlines()[0]}")
    return ConfigError(f"{source}: {err}")


def load_config(files: List[str] | str | None = None, overrides: List[str] | None = None) -> DictConfig:
    """Schema defaults <- YAML files (in order) <- dotted overrides, validated at every merge."""
    cfg = OmegaConf.structured(RunConfig)
    for f in [files] if isinstance(files, str) else (files or []):
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _friendly(err, str(path)) from None
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got: {bad}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as err:
        raise _friendly(err, "command line") from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: enumerations and ranges."""
    from at_core.algorithms import ADVANTAGES, LOSS_AGGS, POLICY_LOSSES
    from at_reward.rules import RULES
    from at_rollout.backends import BACKENDS

    choices = {
        "model.dtype": ("auto", "fp32", "bf16"),
        "data.long_prompts": ("truncate", "drop"),
        "reward.rules": tuple(RULES),
        "algorithm.advantage": tuple(sorted(ADVANTAGES)),
        "algorithm.group_of_one": ("zero", "reward"),
        "algorithm.policy_loss": tuple(sorted(POLICY_LOSSES)),
        "algorithm.loss_agg": tuple(sorted(LOSS_AGGS)),
        "algorithm.kl_estimator": ("k1", "k3", "low_var_kl"),
        "rollout.backend": tuple(BACKENDS),
        "rollout.sync_method": ("tensor", "distributed"),
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {allowed}, got {value!r}")
    for name, st in cfg.stage.items():
        if st.prompt_style not in ("standard", "ellipsis", "no_think"):
            raise ConfigError(
                f"config key 'stage.{name}.prompt_style' must be standard, ellipsis or no_think, "
                f"got {st.prompt_style!r}"
            )
        for key in ("prompts_per_step", "rollouts_per_prompt", "max_response_len"):
            if st[key] < 1:
                raise ConfigError(f"config key 'stage.{name}.{key}' must be >= 1, got {st[key]}")
        if st.steps < 0:
            raise ConfigError(f"config key 'stage.{name}.steps' must be >= 0, got {st.steps}")
    for key in ("rollout.engines", "rollout.engine_threads"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {OmegaConf.select(cfg, key)}")
    if cfg.rollout.engines != 1 and not cfg.rollout.urls and not BACKENDS[cfg.rollout.backend].launches_engines:
        raise ConfigError(f"config key 'rollout.engines' must be 1 with rollout.backend={cfg.rollout.backend}: "
                          "it launches one engine (use its own data parallelism, or list running engines "
                          "in rollout.urls)")
    if str(cfg.start_stage) not in cfg.stage:
        raise ConfigError(f"start_stage={cfg.start_stage} is not a configured stage ({', '.join(cfg.stage)})")


def stage_order(cfg: DictConfig) -> List[str]:
    """Stage names from `start_stage` on, in numeric order."""
    names = sorted(cfg.stage, key=lambda s: int(s) if str(s).isdigit() else 10**9)
    return [s for s in names if not str(s).isdigit() or int(s) >= cfg.start_stage]


def save_config(cfg: DictConfig, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path
