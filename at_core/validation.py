"""In-training evaluation: every `eval.every` steps, the current policy on held-out problems.

The problems are `data.eval_files` (the tiny task's held-out set when none are given and the
model is the tiny world's); sampling follows the `eval` section, the prompt is the stage's
style, and generation goes through the same rollout servers the step uses (so it sees the
weights just synced). The numbers join that step's record as `eval/...` keys, so they land in
`metrics.jsonl` and TensorBoard beside the training metrics.
"""
from __future__ import annotations

from typing import Any, Dict, List

from omegaconf import DictConfig

from at_core.data import Problem, load_problems
from at_core.engines import policy_lm
from at_core.eval import EvalSettings, generate_samples, grade_samples, summarize_graded

SUMMARY_KEYS = ("accuracy", "mean_tokens", "think_rate")


def eval_problems(cfg: DictConfig, model_path: str) -> List[Problem]:
    """The held-out problems of the run (empty: in-training evaluation is off)."""
    if cfg.eval.every <= 0:
        return []
    if cfg.data.eval_files:
        out: List[Problem] = []
        for f in cfg.data.eval_files:
            out += load_problems(f, cfg.data.problem_key, cfg.data.answer_key, cfg.data.answer_extract,
                                 cfg.data.tier_key)
        return out
    from at_core.config import ConfigError
    from at_core.tiny import is_tiny_world
    from at_core.tiny.task import generate_all

    if not is_tiny_world(model_path):
        raise ConfigError(f"eval.every={cfg.eval.every} needs data.eval_files (model.path={model_path} is not a tiny "
                          "world model, whose held-out arithmetic problems would be the default)")
    return generate_all(cfg.data.tiny_eval_size, seed=cfg.seed, split="test")


def due(cfg: DictConfig, global_step: int) -> bool:
    return cfg.eval.every > 0 and global_step % cfg.eval.every == 0


def evaluate(ctx: Any, stage: DictConfig, problems: List[Problem]) -> Dict[str, float]:
    """Collective (every rank takes part in generation); rank 0 grades and returns the metrics."""
    e = ctx.cfg.eval
    settings = EvalSettings(stage.prompt_style, e.samples, e.temperature, e.top_p, e.max_response_len, ctx.cfg.seed)
    samples = generate_samples(lambda ids, p: ctx.rollout.generate(ids, p, policy_lm(ctx.engine)), ctx.tokenizer,
                               problems, settings, desc="eval", show=False)
    if ctx.rank != 0:
        return {}
    graded = grade_samples(problems, samples, ctx.tokenizer, ctx.reward, stage.prompt_style)
    by = "source" if ctx.cfg.data.eval_files else "tier"
    result = summarize_graded(problems, graded, group_by=by)
    out = {f"eval/{k}": float(result[k]) for k in SUMMARY_KEYS}
    for group, row in result["benchmarks" if by == "source" else "tiers"].items():
        out.update({f"eval/{k}/{group}": float(row[k]) for k in SUMMARY_KEYS})
    return out
