"""The RL algorithm as named, registered parts: advantage estimators, policy losses and
loss aggregations. A new one is one decorated function (and its test); the config names
it (`algorithm.advantage`, `algorithm.policy_loss`, `algorithm.loss_agg`)."""
from at_core.algorithms.advantages import ADVANTAGES, estimate_advantages, register_advantage
from at_core.algorithms.losses import LOSS_AGGS, POLICY_LOSSES, kl_penalty, register_loss_agg, register_policy_loss

__all__ = [
    "ADVANTAGES", "estimate_advantages", "register_advantage",
    "POLICY_LOSSES", "LOSS_AGGS", "register_policy_loss", "register_loss_agg", "kl_penalty",
]  # fmt: skip
