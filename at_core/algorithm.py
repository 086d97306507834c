"""GRPO: group-normalised advantages and the token-level clipped policy loss.

Everything here works on per-token tensors of one packed micro-batch; the caller passes
the step's global token count so the loss of every micro-batch on every rank is a slice
of one sum, and the gradient does not depend on how the step was split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch


def group_advantages(rewards: Sequence[float], groups: Sequence[int], std_normalize: bool = True,
                     eps: float = 1e-6) -> List[float]:
    """(r - mean_group) / (std_group + eps); Dr.GRPO drops the division (`std_normalize=False`).

    The std is the unbiased one, as in the reference GRPO implementations; a group of one
    has advantage 0.
    """
    r = torch.tensor(list(rewards), dtype=torch.float64)
    g = torch.tensor(list(groups), dtype=torch.long)
    adv = torch.zeros_like(r)
    for gid in torch.unique(g):
        idx = (g == gid).nonzero(as_tuple=True)[0]
        if len(idx) < 2:
            continue
        vals = r[idx]
        centred = vals - vals.mean()
        adv[idx] = centred / (vals.std(unbiased=True) + eps) if std_normalize else centred
    return adv.tolist()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimates: k1 = log ratio, k3 / low_var_kl = Schulman's k3 (clamped)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator in ("k3", "low_var_kl"):
        kl = torch.exp(-log_ratio) - 1 + log_ratio
        return kl.clamp(-10, 10) if estimator == "low_var_kl" else kl
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k3, low_var_kl)")


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar to backpropagate
    stats: Dict[str, float]  # sums over this micro-batch's tokens (divide by token counts to report)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    scale: float,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "low_var_kl",
) -> LossTerms:
    """Token-level clipped surrogate (separate low/high clip), optional KL and entropy terms.

    All inputs are `[N]` over the response tokens of a micro-batch. `scale` turns the
    token sum into this micro-batch's share of the step's mean (world size / global
    token count, undoing DeepSpeed's data-parallel averaging).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    stats = {
        "pg_loss": per_token.detach().sum().item(),
        "clip_frac": (clipped > unclipped).float().sum().item(),
    }
    if entropy is not None:
        stats["entropy"] = entropy.detach().sum().item()
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        stats["kl"] = kl.detach().sum().item()
        if kl_coef:
            per_token = per_token + kl_coef * kl
    return LossTerms(loss=per_token.sum() * scale, stats=stats)
