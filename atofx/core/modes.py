"""Running a model in eval mode for a moment, and putting every layer's training flag back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module, no_grad: bool = True) -> Iterator[nn.Module]:
    """Eval mode (and no autograd, unless `no_grad` is False) inside the block; afterwards exactly the layers
    that were training train again, even if the block raised."""
    training = [m for m in model.modules() if m.training]  # only these change back
    model.eval()  # through eval(): a module that overrides train() sees the switch
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        for m in training:
            m.training = True
