"""Walking nested values and running a module in eval mode: the one copy the passes (and the layers above) use.

Model inputs and outputs are tensors nested in tuples, lists and dicts; checks that compare or count them
walk that structure with `tensors_in`. A check that runs a model in eval mode must give every layer back
the mode it had, even when the run fails: `evaluating` does; `device_of` is the device it runs on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a value nested in tuples, lists and dicts (dicts in their order), depth first."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []


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


def device_of(module: nn.Module) -> torch.device | None:
    """The device of `module`'s first parameter, else of its first buffer; None if it has neither."""
    state = next(module.parameters(), None)
    state = state if state is not None else next(module.buffers(), None)
    return None if state is None else state.device
