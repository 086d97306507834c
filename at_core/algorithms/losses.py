"""Policy losses (per token) and loss aggregations (how per-token losses become one number).

A policy loss is `fn(logp, old_logp, advantages, algo) -> (per_token_loss, stats)`
registered with `@register_policy_loss("name")`; all tensors are `[N]` over the response
tokens of one packed micro-batch. The entropy bonus and the KL term are added per token by
`token_loss`, the same for every policy loss.

An aggregation is `fn(seq_lens, step) -> weights` registered with
`@register_loss_agg("name")`: `seq_lens` are the response lengths of one micro-batch's
sequences, `step` the counts of the whole mini-batch over every rank (`StepCounts`), the
result is one weight per token of the micro-batch, and the micro-batch's loss is
`sum(weight * per_token_loss)`. A token's weight *is* its gradient weight, so the choice
decides how much long and short responses count. DeepSpeed averages gradients over the
`world` ranks, which the global forms undo by multiplying by `world`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence, Tuple

import torch

POLICY_LOSSES: Dict[str, Callable[..., Tuple[torch.Tensor, Dict[str, float]]]] = {}
LOSS_AGGS: Dict[str, Callable[..., torch.Tensor]] = {}


def register_policy_loss(name: str) -> Callable:
    def decorate(fn: Callable) -> Callable:
        POLICY_LOSSES[name] = fn
        return fn

    return decorate


def register_loss_agg(name: str) -> Callable:
    def decorate(fn: Callable) -> Callable:
        LOSS_AGGS[name] = fn
        return fn

    return decorate


# ---------------------------------------------------------------- policy losses


@register_policy_loss("clipped")
def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, algo: Any):
    """PPO's clipped surrogate with separate low and high clips (DAPO's clip-higher when
    `clip_high > clip_low`: rare tokens whose probability should grow may grow further)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - algo.clip_low, 1 + algo.clip_high)
    per_token = torch.maximum(unclipped, clipped)
    return per_token, {"pg_loss": per_token.detach().sum().item(),
                       "clip_frac": (clipped > unclipped).float().sum().item()}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimates: k1 = log ratio, k3 / low_var_kl = Schulman's k3 (clamped)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator in ("k3", "low_var_kl"):
        kl = torch.exp(-log_ratio) - 1 + log_ratio
        return kl.clamp(-10, 10) if estimator == "low_var_kl" else kl
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k3, low_var_kl)")


def token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, algo: Any, *,
               entropy: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None):
    """The configured policy loss plus the entropy bonus and the KL term, per token; stats
    are sums over the micro-batch's tokens (divide by token counts to report)."""
    per_token, stats = POLICY_LOSSES[algo.policy_loss](logp, old_logp, advantages, algo)
    if entropy is not None:
        stats["entropy"] = entropy.detach().sum().item()
        if algo.entropy_coef:
            per_token = per_token - algo.entropy_coef * entropy
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, algo.kl_estimator)
        stats["kl"] = kl.detach().sum().item()
        if algo.kl_coef:
            per_token = per_token + algo.kl_coef * kl
    return per_token, stats


# ---------------------------------------------------------------- aggregations


@dataclass(frozen=True)
class StepCounts:
    """What one mini-batch holds over every rank, and the constants some forms need."""

    tokens: int  # response tokens
    sequences: int  # responses
    world: int  # data-parallel ranks (DeepSpeed averages their gradients)
    max_response_len: int  # the stage's response cap (Dr.GRPO's constant normaliser)


def _per_token(seq_lens: Sequence[int], per_seq: Sequence[float]) -> torch.Tensor:
    return torch.repeat_interleave(torch.tensor(per_seq, dtype=torch.float32),
                                   torch.tensor(list(seq_lens), dtype=torch.long))


@register_loss_agg("token_mean")
def token_mean(seq_lens: Sequence[int], step: StepCounts) -> torch.Tensor:
    """One mean over every response token of the mini-batch: each token counts the same, so
    a long response weighs in proportion to its length, and the result does not depend on
    how the mini-batch is split into micro-batches or ranks (ours, the default)."""
    return _per_token(seq_lens, [step.world / max(step.tokens, 1)] * len(seq_lens))


@register_loss_agg("micro_batch_token_mean")
def micro_batch_token_mean(seq_lens: Sequence[int], step: StepCounts) -> torch.Tensor:
    """The reference code's form: a token mean inside each micro-batch, the micro-batch means
    summed (and averaged over ranks). A token's weight depends on how many tokens share its
    micro-batch, so the packing changes the gradient; kept to reproduce the paper."""
    total = max(sum(seq_lens), 1)
    return _per_token(seq_lens, [1.0 / total] * len(seq_lens))


@register_loss_agg("seq_mean_token_mean")
def seq_mean_token_mean(seq_lens: Sequence[int], step: StepCounts) -> torch.Tensor:
    """The mean over responses of each response's token mean (the original GRPO): every
    response counts the same, so a long response's tokens each count less."""
    return _per_token(seq_lens, [step.world / (max(step.sequences, 1) * max(n, 1)) for n in seq_lens])


@register_loss_agg("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(seq_lens: Sequence[int], step: StepCounts) -> torch.Tensor:
    """Token sums over a constant, responses x the response cap (Dr.GRPO): every token
    counts the same whatever the batch holds, removing the length bias of per-response means
    without making the loss scale depend on the batch's own token count."""
    norm = max(step.sequences, 1) * max(step.max_response_len, 1)
    return _per_token(seq_lens, [step.world / norm] * len(seq_lens))


def loss_weights(algo: Any, seq_lens: Sequence[int], step: StepCounts) -> torch.Tensor:
    if algo.loss_agg not in LOSS_AGGS:
        raise ValueError(f"algorithm.loss_agg must be one of {', '.join(sorted(LOSS_AGGS))}, got {algo.loss_agg!r}")
    return LOSS_AGGS[algo.loss_agg](seq_lens, step)
