"""The controller's FLOPs regulariser R(P(w), p*) and its loss (ATO, Eq. 5).

`target` is p*, the fraction of the model's FLOPs to keep; `total` is P_total (`FlopsModel.total`).
The regulariser is zero while the masked model fits the budget and grows like log(P) above it,
so it only pushes the controller down to the budget, never below.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flops_regularizer(p: Tensor, target: float, total: float) -> Tensor:
    """log(max(p, target * total) / (target * total)): 0 when p <= budget, d/dp = 1/p above it."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target is the fraction of FLOPs kept, in (0, 1]; got {target}.")
    if total <= 0:
        raise ValueError(f"total FLOPs must be positive; got {total}.")
    budget = target * total
    return torch.log(torch.clamp(p, min=budget) / budget)


def controller_loss(task_loss: Tensor, p: Tensor, target: float, total: float, gamma: float = 4.0) -> Tensor:
    """task_loss + gamma * R(p): what the controller minimises on D_CN (paper default gamma = 4)."""
    return task_loss + gamma * flops_regularizer(p, target, total)
