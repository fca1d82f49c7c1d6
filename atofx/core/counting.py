"""Counting FLOPs and parameters of any module, as torch's own counter sees them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one eval-mode forward, counted by `torch.utils.flop_counter.FlopCounterMode`.

    FLOPs = 2 x MACs: a multiply-add counts as two operations. Torch-Pruning (`count_ops_and_params`) and many
    papers report MACs: torchvision's ResNet-18 at 224x224 is 3.63 G FLOPs here and 1.82 G MACs there.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one eval-mode forward: `count_flops // 2`, what Torch-Pruning calls ops."""
    return count_flops(model, example_inputs) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameter entries."""
    return sum(p.numel() for p in model.parameters())
