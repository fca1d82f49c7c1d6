"""One model of the user-style CNN zoo (`Entry`: constructor and input shapes) and the conv block its files share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it and the shapes of its inputs (one per forward argument)."""

    name: str
    make: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]

    def inputs(self, seed: int) -> tuple[torch.Tensor, ...]:
        """Standard-normal inputs of the entry's shapes, drawn from their own seeded generator."""
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(shape, generator=gen) for shape in self.shapes)

    @property
    def pattern(self) -> str:
        """The first line of the model class's docstring."""
        model_class = self.make if isinstance(self.make, type) else type(self.make())
        return (model_class.__doc__ or "").strip().splitlines()[0]


def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU, the block every user writes first."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
