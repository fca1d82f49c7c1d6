"""Walking nested values and running a module in eval mode: the one copy the passes (and the layers above) use.

Model inputs and outputs are tensors nested in tuples, lists and dicts; checks that compare or count them
walk that structure with `tensors_in`. A check that runs a model in eval mode must give it back in the
mode it had, even when the run fails: `eval_mode` does both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block, and back in the mode it had after it, even on an error."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
