"""The policy update: packed micro-batches, global-token loss scaling, one DeepSpeed step per mini-batch.

ZeRO-3 all-gathers parameters inside every forward and backward, so all ranks must run the
same number of micro-batches; a rank with fewer runs zero-weighted filler passes. The loss
of each micro-batch is the weighted sum of its per-token losses, the weights given by the
configured aggregation (`at_core.algorithms.losses`): with `token_mean` the gradient is the
mean over every response token of the mini-batch, however it is split.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from at_core.algorithms.losses import StepCounts, loss_weights, token_loss
from at_core.attention import reads_shared_prompts
from at_core.engines import policy_lm
from at_core.packing import Example, pack, plan_examples


def _all_reduce(values: List[float], op=dist.ReduceOp.SUM) -> List[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _device(engine) -> torch.device:
    return next(engine.module.parameters()).device


def shares_prompts(engine, algo: DictConfig) -> bool:
    """Whether micro-batches share each prompt among its rollouts: as configured, where the
    attention can read a shared layout."""
    return bool(algo.share_prompts) and reads_shared_prompts(policy_lm(engine).config)


def _micro_plan(examples: Sequence[Example], token_budget: int, share: bool) -> List[List[int]]:
    """This rank's micro-batches, padded to the largest count on any rank (empty = filler)."""
    plan = plan_examples(examples, token_budget, share) if examples else []
    count = int(_all_reduce([len(plan)], dist.ReduceOp.MAX)[0])
    return plan + [[] for _ in range(count - len(plan))]


@torch.no_grad()
def compute_logprobs(engine, examples: Sequence[Example], algo: DictConfig, temperature: float) -> List[List[float]]:
    """Per-token log-probs of each rollout's response under `engine` (old policy or reference)."""
    out: List[List[float]] = [[] for _ in examples]
    filler = [examples[0]] if examples else []
    share = shares_prompts(engine, algo)
    for idx in _micro_plan(examples, algo.micro_batch_tokens, share):
        group = [examples[i] for i in idx] or filler
        if not group:  # this rank has no data at all this step: still take part in the gathers
            group = [Example(prompt_ids=[0], response_ids=[0])]
        batch = pack(group, _device(engine), share)
        logp, _ = engine(batch, temperature, chunk=algo.logprob_chunk)
        if idx:
            for k, i in enumerate(idx):
                out[i] = logp[batch.seq_of_token == k].tolist()
    return out


def update_policy(engine, examples: Sequence[Example], algo: DictConfig, temperature: float,
                  ref_logprobs: Optional[List[List[float]]] = None, n_mini: int = 1,
                  max_response_len: int = 1) -> Dict[str, float]:
    """One RL step's policy update over this rank's examples: ppo_epochs x n_mini optimizer steps.

    Mini-batches are contiguous slices of the examples (which arrive grouped by prompt), so
    a prompt's group stays in one mini-batch whenever the slices allow it.
    """
    stats: Dict[str, float] = defaultdict(float)
    n_mini = max(1, min(n_mini, len(examples)) if examples else n_mini)
    n_mini = int(_all_reduce([n_mini], dist.ReduceOp.MIN)[0])  # every rank steps the optimizer as often
    on_policy = algo.ppo_epochs * n_mini == 1
    if not on_policy:
        olds = compute_logprobs(engine, examples, algo, temperature)
        for r, lp in zip(examples, olds):
            r.old_logprobs = lp
    bounds = [round(m * len(examples) / n_mini) for m in range(n_mini + 1)]
    minis = [list(range(bounds[m], bounds[m + 1])) for m in range(n_mini)]
    steps = 0
    for _ in range(algo.ppo_epochs):
        for mini in minis:
            refs = None if ref_logprobs is None else [ref_logprobs[i] for i in mini]
            for k, v in backward_mini_batch(engine, [examples[i] for i in mini], algo, temperature,
                                            on_policy, refs, max_response_len).items():
                stats[k] += v
            own_norm = _unreported_grad_norm(engine)
            engine.step()
            steps += 1
            grad_norm = engine.get_global_grad_norm() if own_norm is None else own_norm
            stats["grad_norm"] += float(grad_norm) if grad_norm is not None else 0.0
    keys = sorted(k for k in stats if k != "grad_norm")
    totals = dict(zip(keys, _all_reduce([stats[k] for k in keys])))
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    out = {k: v / tokens for k, v in totals.items()}
    out["grad_norm"] = stats["grad_norm"] / max(steps, 1)
    out["update_tokens"] = tokens / max(algo.ppo_epochs, 1)
    out["lr"] = engine.optimizer.param_groups[0]["lr"]
    return out


def _unreported_grad_norm(engine) -> Optional[float]:
    """The gradient norm where DeepSpeed will not report it, taken before the step clips and
    zeroes the gradients; None where it will.

    DeepSpeed's ZeRO and mixed-precision optimizers keep the norm they clip with; its plain
    fp32 path (ZeRO stage 0, e.g. the tiny run) clips without keeping it. Gradients there
    are whole on every rank, already averaged across ranks at the accumulation boundary.
    """
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _advantages(group: Sequence[Example]) -> List[float]:
    """Per response token: a scalar advantage repeated, or a token-level estimator's list."""
    out: List[float] = []
    for r in group:
        if isinstance(r.advantage, (list, tuple)):
            if len(r.advantage) != len(r.response_ids):
                raise ValueError(f"a token-level advantage has {len(r.advantage)} values for "
                                 f"{len(r.response_ids)} response tokens")
            out.extend(float(a) for a in r.advantage)
        else:
            out.extend([float(r.advantage)] * len(r.response_ids))
    return out


def backward_mini_batch(engine, local: Sequence[Example], algo: DictConfig, temperature: float,
                        on_policy: bool = True, ref_logprobs: Optional[List[List[float]]] = None,
                        max_response_len: int = 1) -> Dict[str, float]:
    """Forward/backward over this rank's share of one mini-batch; gradients accumulate, no step."""
    stats: Dict[str, float] = defaultdict(float)
    world = dist.get_world_size() if dist.is_initialized() else 1
    tokens, seqs = _all_reduce([sum(len(r.response_ids) for r in local), len(local)])
    counts = StepCounts(int(tokens), int(seqs), world, int(max_response_len))
    share = shares_prompts(engine, algo)
    plan = _micro_plan(local, algo.micro_batch_tokens, share)
    for j, idx in enumerate(plan):
        engine.set_gradient_accumulation_boundary(j == len(plan) - 1)
        group = [local[i] for i in idx]
        filler = not group
        if filler:  # keep ZeRO-3's collectives in step with the other ranks
            group = list(local[:1]) or [Example(prompt_ids=[0], response_ids=[0])]
        batch = pack(group, _device(engine), share)
        logp, ent = engine(batch, temperature, with_entropy=True, chunk=algo.logprob_chunk)
        adv = torch.tensor(_advantages(group), dtype=torch.float32, device=logp.device)
        old = logp.detach() if on_policy or filler else torch.tensor(
            [x for r in group for x in r.old_logprobs], dtype=torch.float32, device=logp.device)
        ref = None
        if ref_logprobs is not None:
            ref = logp.detach() if filler else torch.tensor(
                [x for i in idx for x in ref_logprobs[i]], dtype=torch.float32, device=logp.device)
        per_token, terms = token_loss(logp, old, adv, algo, entropy=ent, ref_logp=ref)
        weights = loss_weights(algo, [len(r.response_ids) for r in group], counts).to(logp.device)
        engine.backward((per_token * weights).sum() * (0.0 if filler else 1.0), scale_wrt_gas=False)
        if not filler:
            for k, v in terms.items():
                stats[k] += v
            stats["tokens"] += float(batch.targets.numel())
    return stats
