"""The AutoThink RL loop: prompts -> rollout -> reward -> advantage -> update -> sync -> record.

`train` runs the configured stages in order (stage 1 batch balance, stage 2 accuracy,
stage 3 length shaping); `rl_step` is one step of the method and reads like it. Rank 0
talks to the rollout server(s) and grades; every rank trains on its shard of the prompts.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from at_core import checkpoint, validation
from at_core.actor import compute_logprobs, update_policy
from at_core.algorithms import estimate_advantages
from at_core.config import ConfigError, save_config, stage_order
from at_core.data import Problem
from at_core.engines import build_actor, build_reference, init_distributed, policy_lm, reset_optimizer, set_lr
from at_core.export import export_hf
from at_core.packing import Example
from at_core.prompts import render_prompt
from at_core.recorder import Recorder
from at_core.rollout import RolloutWorkers, Sample, broadcast_from_rank0
from at_core.stream import PromptStream

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: DictConfig
    out_dir: Path
    model_path: str
    tokenizer: Any
    engine: Any
    reference: Any
    rollout: RolloutWorkers
    reward: Any  # at_reward.registry.Reward on rank 0, None elsewhere
    recorder: Recorder
    stream: PromptStream
    state: checkpoint.TrainState
    rank: int = 0
    world: int = 1
    on_stage_end: Optional[Callable[["Context", str, Path], None]] = None
    eval_problems: List[Problem] = field(default_factory=list)  # held-out problems (eval.every > 0)


# ---------------------------------------------------------------- the steps of one RL step


def tokenize_prompt(tokenizer, problem: str, style: str) -> List[int]:
    return tokenizer(render_prompt(tokenizer, problem, style), add_special_tokens=False)["input_ids"]


def encode_prompts(ctx: Context, problems: List[Problem], style: str) -> List[List[int]]:
    out = []
    for p in problems:
        ids = tokenize_prompt(ctx.tokenizer, p.problem, style)
        if len(ids) > ctx.cfg.max_prompt_len:
            ids = ids[-ctx.cfg.max_prompt_len :]  # keep the template's tail (the think opener)
        out.append(ids)
    return out


def drop_long_prompts(cfg: DictConfig, tokenizer, problems: List[Problem]) -> List[Problem]:
    """`data.long_prompts=drop` (the reference): keep the problems whose prompt fits
    `max_prompt_len` in every prompt style the stages use."""
    styles = sorted({cfg.stage[s].prompt_style for s in stage_order(cfg)})
    kept = [p for p in problems
            if all(len(tokenize_prompt(tokenizer, p.problem, st)) <= cfg.max_prompt_len for st in styles)]
    if not kept:
        raise ConfigError(f"data.long_prompts=drop: every one of the {len(problems)} training problems is longer "
                          f"than max_prompt_len={cfg.max_prompt_len} tokens")
    if len(kept) < len(problems):
        log.info("dropped %d of %d training problems longer than max_prompt_len=%d tokens",
                 len(problems) - len(kept), len(problems), cfg.max_prompt_len)
    return kept


def sampling_params(stage: DictConfig, seed: int) -> Dict[str, Any]:
    return {
        "max_new_tokens": stage.max_response_len,
        "temperature": stage.temperature,
        "top_p": stage.top_p,
        "n": stage.rollouts_per_prompt,
        "sampling_seed": seed,
    }


def score(ctx: Context, problems: List[Problem], prompt_ids: List[List[int]], samples: List[List[Sample]],
          stage: DictConfig) -> Dict[str, Any]:
    """Grade and shape the whole batch on rank 0 (batch balance needs all of it); share the result.

    The `reference` rules read prompt + response decoded with special tokens, as the
    authors' code does; the `project` rules read the response without them.
    """
    result = None
    if ctx.rank == 0:
        with_prompts = ctx.reward.rules.needs_prompts
        skip = not with_prompts
        texts, prompts, golds, groups, lengths, tiers = [], [], [], [], [], []
        for g, (prob, ids, group) in enumerate(zip(problems, prompt_ids, samples)):
            prompt = ctx.tokenizer.decode(ids, skip_special_tokens=False) if with_prompts else ""
            for s in group:
                texts.append(ctx.tokenizer.decode(s.output_ids, skip_special_tokens=skip))
                prompts.append(prompt)
                golds.append(prob.answer)
                groups.append(g)
                lengths.append(len(s.output_ids))
                tiers.append(prob.tier)
        out = ctx.reward(texts, golds, groups, lengths, prompts=prompts, shaping=OmegaConf.to_object(stage.shaping))
        result = {
            "rewards": out.rewards, "think": out.think, "correct": out.correct, "groups": groups,
            "format_ok": out.format_ok, "lengths": lengths, "tiers": tiers,
        }
    return broadcast_from_rank0(result)


def my_examples(ctx: Context, prompt_ids: List[List[int]], samples: List[List[Sample]], scored) -> List[Example]:
    """This rank's shard of the batch: whole prompt groups, prompts[rank::world]."""
    out, k = [], 0
    for g, (ids, group) in enumerate(zip(prompt_ids, samples)):
        for s in group:
            if g % ctx.world == ctx.rank and s.output_ids:
                out.append(Example(prompt_ids=ids, response_ids=list(s.output_ids), advantage=scored["advantages"][k]))
            k += 1
    return out


def batch_metrics(scored: Dict[str, Any]) -> Dict[str, float]:
    """think_rate, accuracy and lengths overall, by mode and by difficulty tier."""
    n = max(len(scored["rewards"]), 1)
    m: Dict[str, float] = {
        "reward_mean": sum(scored["rewards"]) / n,
        "accuracy": sum(scored["correct"]) / n,
        "think_rate": sum(scored["think"]) / n,
        "format_error_rate": 1 - sum(scored["format_ok"]) / n,
        "response_len": sum(scored["lengths"]) / n,
    }
    for mode, flag in (("think", True), ("no_think", False)):
        lens = [L for L, t in zip(scored["lengths"], scored["think"]) if t == flag]
        m[f"response_len/{mode}"] = sum(lens) / len(lens) if lens else 0.0
    by_tier = defaultdict(list)
    for i, tier in enumerate(scored["tiers"]):
        if tier is not None:
            by_tier[tier].append(i)
    for tier, idx in by_tier.items():
        m[f"think_rate/{tier}"] = sum(scored["think"][i] for i in idx) / len(idx)
        m[f"accuracy/{tier}"] = sum(scored["correct"][i] for i in idx) / len(idx)
    return m


class Clock(dict):
    """Seconds per phase of a step: `with clock("rollout"): ...` records `time/rollout`."""

    @contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        yield
        self[f"time/{phase}"] = time.perf_counter() - t


def update(ctx: Context, stage: DictConfig, examples: List[Example]) -> Dict[str, float]:
    """The policy update of one step: reference log-probs when a KL term is on, then
    `algorithm.mini_batch_prompts`-sized optimizer steps."""
    algo = ctx.cfg.algorithm
    ref = None
    if ctx.reference is not None:
        ref = compute_logprobs(ctx.reference, examples, algo, stage.temperature)
    n_mini = -(-stage.prompts_per_step // algo.mini_batch_prompts) if algo.mini_batch_prompts else 1
    return update_policy(ctx.engine, examples, algo, stage.temperature, ref, n_mini, stage.max_response_len)


def rl_step(ctx: Context, stage_name: str) -> Dict[str, float]:
    stage = ctx.cfg.stage[stage_name]
    clock = Clock()
    with clock("rollout"):
        problems = ctx.stream.take(stage.prompts_per_step)
        prompt_ids = encode_prompts(ctx, problems, stage.prompt_style)
        seed = (ctx.cfg.seed * 1_000_003 + ctx.state.global_step) % 2**31
        samples = ctx.rollout.generate(prompt_ids, sampling_params(stage, seed), policy_lm(ctx.engine))
    with clock("reward"):
        scored = score(ctx, problems, prompt_ids, samples, stage)
        scored["advantages"] = estimate_advantages(ctx.cfg.algorithm, scored["rewards"], scored["groups"],
                                                   scored["lengths"])
    with clock("train"):
        ctx.rollout.release()  # colocated engines give their GPU memory to the update
        stats = update(ctx, stage, my_examples(ctx, prompt_ids, samples, scored))
    with clock("sync"):
        ctx.rollout.resume()
        ctx.rollout.sync(policy_lm(ctx.engine), weight_version=ctx.state.global_step + 1)  # the step it ends
    generated_per_s = sum(scored["lengths"]) / max(sum(clock.values()), 1e-9)
    return {**batch_metrics(scored), **stats, **clock, **ctx.rollout.metrics(), "tokens_per_s": generated_per_s,
            "batch_digest": batch_digest(problems)}


def batch_digest(problems: List[Problem]) -> str:
    """A short fingerprint of the step's prompts: lets a resumed run prove it saw the same data."""
    import hashlib

    return hashlib.sha1("\x1f".join(p.problem for p in problems).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the run


def start_stage(ctx: Context, stage: DictConfig) -> None:
    """What a stage does before its first step: the reference code runs each stage as a
    separate job, so `reset_optimizer` forgets AdamW's moments and `reshuffle` starts a fresh
    permutation of the data. Both are repeated, identically, when a run resumes at step 0."""
    if stage.reset_optimizer:
        reset_optimizer(ctx.engine)
    if stage.reshuffle:
        ctx.stream.start_epoch()


def learning_rate(ctx: Context, stage: DictConfig) -> float:
    """The stage's lr (or `algorithm.lr`), ramped linearly over the run's first
    `algorithm.warmup_steps` steps."""
    lr = stage.lr if stage.lr is not None else ctx.cfg.algorithm.lr
    warmup = ctx.cfg.algorithm.warmup_steps
    return lr * min(1.0, (ctx.state.global_step + 1) / warmup) if warmup > 0 else lr


def run_stage(ctx: Context, name: str) -> None:
    stage = ctx.cfg.stage[name]
    if ctx.state.step == 0:
        start_stage(ctx, stage)
    bar = tqdm(total=stage.steps, initial=ctx.state.step, desc=f"stage {name}", disable=ctx.rank != 0,
               dynamic_ncols=True)
    while ctx.state.step < stage.steps:
        set_lr(ctx.engine, learning_rate(ctx, stage))
        metrics = rl_step(ctx, name)
        ctx.state.step += 1
        ctx.state.global_step += 1
        ctx.state.data_position = ctx.stream.position
        if validation.due(ctx.cfg, ctx.state.global_step):
            metrics.update(validation.evaluate(ctx, stage, ctx.eval_problems))
        ctx.recorder.log({"stage": name, "step": ctx.state.step, "global_step": ctx.state.global_step, **metrics})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        think=f"{metrics['think_rate']:.2f}", len=f"{metrics['response_len']:.0f}")
        if ctx.cfg.save_every and ctx.state.step % ctx.cfg.save_every == 0 and ctx.state.step < stage.steps:
            checkpoint.save(ctx.engine, ctx.out_dir, ctx.state, ctx.cfg.keep_checkpoints)
    bar.close()
    finish_stage(ctx, name)


def finish_stage(ctx: Context, name: str) -> None:
    """Export the stage's policy as an HF directory, run the stage-end hook, checkpoint the boundary."""
    export_dir = ctx.out_dir / "export" / f"stage{name}"
    export_hf(policy_lm(ctx.engine), ctx.tokenizer, export_dir)
    if ctx.on_stage_end is not None:
        ctx.on_stage_end(ctx, name, export_dir)
    order = stage_order(ctx.cfg)
    nxt = order[order.index(name) + 1] if order.index(name) + 1 < len(order) else "done"
    ctx.state = checkpoint.TrainState(nxt, 0, ctx.state.global_step, ctx.stream.position)
    checkpoint.save(ctx.engine, ctx.out_dir, ctx.state, ctx.cfg.keep_checkpoints)


def setup(cfg: DictConfig, train_problems: List[Problem], model_path: str) -> Context:
    from transformers import AutoTokenizer

    from at_reward.registry import build_reward

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        save_config(cfg, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    render_prompt(tokenizer, "1 + 1", "standard")  # a directory without a chat template fails here, early
    eval_problems = validation.eval_problems(cfg, model_path)
    engine = build_actor(model_path, cfg)
    reference = build_reference(model_path, cfg) if cfg.algorithm.kl_coef > 0 else None
    state = checkpoint.TrainState(str(stage_order(cfg)[0]), 0, 0, 0)
    found = checkpoint.find(out_dir, cfg.resume)
    if found is not None:
        state = checkpoint.load(engine, found)
        if rank == 0:
            log.info("resumed from %s (stage %s, step %d)", found, state.stage, state.step)
    recorder = Recorder(out_dir, enabled=rank == 0)
    recorder.truncate_after(state.global_step)
    if cfg.data.long_prompts == "drop":
        train_problems = drop_long_prompts(cfg, tokenizer, train_problems)
    stream = PromptStream(train_problems, seed=cfg.seed, shuffle=cfg.data.shuffle, position=state.data_position)
    reward = build_reward(cfg.reward) if rank == 0 else None
    rollout = RolloutWorkers(cfg.rollout, model_path, out_dir, rank)
    rollout.start(policy_lm(engine), weight_version=state.global_step)  # a resumed actor is synced in
    return Context(cfg, out_dir, model_path, tokenizer, engine, reference, rollout, reward, recorder, stream,
                   state, rank, world, eval_problems=eval_problems)


def train(cfg: DictConfig, train_problems: List[Problem], model_path: str,
          on_stage_end: Optional[Callable[[Context, str, Path], None]] = None) -> Context:
    """Run every configured stage from `start_stage` (or from the resumed checkpoint) to the end."""
    ctx = setup(cfg, train_problems, model_path)
    ctx.on_stage_end = on_stage_end
    try:
        order = stage_order(cfg)
        if ctx.state.stage != "done":
            for name in order[order.index(ctx.state.stage):]:
                if ctx.state.stage != name:  # entering a stage after the previous one finished
                    ctx.state = checkpoint.TrainState(name, 0, ctx.state.global_step, ctx.stream.position)
                run_stage(ctx, name)
    finally:
        ctx.rollout.close()
        if ctx.reward is not None:
            ctx.reward.close()
        ctx.recorder.close()
    return ctx
