"""Counting FLOPs and parameters of any module, as torch's own counter sees them."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from atofx.core.nested import as_tuple, on_device_of
from atofx.passes.values import evaluating


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one eval-mode forward, counted by `torch.utils.flop_counter.FlopCounterMode`.

    FLOPs = 2 x MACs: a multiply-add counts as two operations. Torch-Pruning (`count_ops_and_params`) and many
    papers report MACs: torchvision's ResNet-18 at 224x224 is 3.63 G FLOPs here and 1.82 G MACs there.
    `example_inputs` move to the model's device.
    """
    with evaluating(model), FlopCounterMode(display=False) as counter:
        model(*on_device_of(model, as_tuple(example_inputs)))
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one eval-mode forward: `count_flops // 2`, what Torch-Pruning calls ops."""
    return count_flops(model, example_inputs) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameter entries."""
    return sum(p.numel() for p in model.parameters())
