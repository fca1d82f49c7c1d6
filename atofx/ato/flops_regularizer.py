"""The controller's FLOPs regulariser R(P(w), p*) and its loss (ATO, Eq. 5).

`target` is p*, the fraction of the model's FLOPs to keep; `total` is P_total (`FlopsModel.total`).
Two forms:
- "paper" (Eq. 5): log(max(P, p* P_total) / (p* P_total)), zero while the masked model fits the budget
  and growing like log(P) above it, so it only pushes the controller down to the budget, never below;
- "official" (the authors' released code): two-sided, log(r / p*) above the budget and log(p* / r)
  below it (r = P / P_total), flat within a dead band of +-0.005 around p*, and weighted 2 * gamma
  (their loss adds `2 * resource_constraint(...)` with weight 4: an effective gamma of 8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atofx.errors import ConfigError

DEAD_BAND = 0.005  # the official code's band around p*, in shares of P_total
REGULARIZERS = ("paper", "official")


def flops_regularizer(p: Tensor, target: float, total: float) -> Tensor:
    """log(max(p, target * total) / (target * total)): 0 when p <= budget, d/dp = 1/p above it."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target is the fraction of FLOPs kept, in (0, 1]; got {target}.")
    if total <= 0:
        raise ConfigError(f"total FLOPs must be positive; got {total}.")
    budget = target * total
    return torch.log(torch.clamp(p, min=budget) / budget)


def two_sided_regularizer(p: Tensor, target: float, total: float) -> Tensor:
    """The official code's form: log(max(r, p*+band) / p*) above p*, log(p* / min(r, p*-band)) at or below it."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target is the fraction of FLOPs kept, in (0, 1]; got {target}.")
    r = p / total
    above = torch.log(torch.clamp(r, min=target + DEAD_BAND) / target)
    below = torch.log(target / torch.clamp(r, max=target - DEAD_BAND).clamp_min(1e-12))
    return torch.where(r > target, above, below)  # no host sync: the controller step stays asynchronous


def controller_loss(task_loss: Tensor, p: Tensor, target: float, total: float, gamma: float = 4.0,
                    form: str = "paper") -> Tensor:
    """task_loss + gamma * R(p) ("paper", default gamma 4) or + 2 * gamma * R_two_sided(p) ("official")."""
    if form == "official":
        return task_loss + 2.0 * gamma * two_sided_regularizer(p, target, total)
    return task_loss + gamma * flops_regularizer(p, target, total)
