"""Walking the nested inputs and outputs models take and give: tensors inside tuples, lists and dicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from atofx.passes.values import device_of


def map_tensors(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """The same structure with every tensor `t` replaced by `fn(t)`; tuples, lists and dicts are walked, the rest kept."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple takes its fields as arguments
        return type(x)(*(map_tensors(fn, v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    return x


def leaves(x: Any, path: str) -> list[tuple[str, Any]]:
    """Every leaf of `x` with its path from `path` (`input 0[1]['mask']`), in order."""
    if isinstance(x, dict):
        return [leaf for k, v in x.items() for leaf in leaves(v, f"{path}[{k!r}]")]
    if isinstance(x, (tuple, list)):
        return [leaf for i, v in enumerate(x) for leaf in leaves(v, f"{path}[{i}]")]
    return [(path, x)]


def shape_of(t: torch.Tensor) -> str:
    """`(2, 3) float32`: a tensor's shape and dtype for messages."""
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def describe(x: Any) -> str:
    """The shapes and dtypes of a nested input, for messages."""
    if isinstance(x, torch.Tensor):
        return shape_of(x)
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in x) + ")"
    return type(x).__name__


def on_device_of(module: torch.nn.Module, x: Any) -> Any:
    """`x` with its tensors on `module`'s device (`device_of`; as it is if the module has no state): example
    inputs given on the CPU still run a model that was trained, and so moved, on a GPU."""
    device = device_of(module)
    return x if device is None else map_tensors(lambda t: t.to(device), x)


def as_tuple(example_inputs: Any) -> tuple:
    """A forward's positional inputs: one tensor becomes a 1-tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)
