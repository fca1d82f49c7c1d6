"""Shape propagation for the analysis: fx's ShapeProp, with less work per node and no arithmetic in layers.

The analysis needs each node's shape, dtype, strides and memory format, never its values. Convolutions,
linear and batch-norm layers are most of a CNN's forward time, and their output metadata follows from
the input's and the layer's hyper-parameters alone (the shape shortcut of the layer's entry in the op
table): `ShapeProp(shape_only=True)` hands them a zero tensor of that shape instead of computing it
(only for the plain torch classes, in eval mode, on row-major inputs, without autograd or hooks, where
that metadata is certain). Values downstream are then not the model's: a graph that fails on them is
rerun by the caller with `shape_only=False`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.nn.modules import module as _module_hooks

from atofx.errors import ShapeError

from . import op_rules


class NodeFailed(ShapeError):
    """A node failed during shape propagation: the node and the root cause. The analysis catches it and
    raises a ShapeError that names the example inputs; a direct user of `ShapeProp` gets this one."""

    def __init__(self, node: fx.Node, exc: Exception):
        super().__init__(f"shape propagation failed at node '{node.name}' ({node.op} {node.target}): "
                         f"{type(exc).__name__}: {exc}. Check that the inputs are shaped like one real batch.")
        self.node, self.exc = node, exc


def _memory_format(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format fx's ShapeProp records, asked of the tensor directly (fx's own check is symbolic-aware
    and slow); contiguous first, as fx finds it, for tensors that are dense in several formats."""
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if t.is_contiguous(memory_format=fmt):
            return fmt
    return None


def tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """fx's `_extract_tensor_metadata`, faster for plain dense tensors."""
    if t.layout != torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), _memory_format(t), False, {})


def _output_shape(m: nn.Module, args: tuple, kwargs: dict) -> list[int] | None:
    """The output shape of a layer whose op-table entry has a shape shortcut (plain conv, linear, eval-mode
    batch norm) on `args`, or None where only running it can tell."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    shortcut = op_rules.OPS.shape_shortcut(type(m))
    return None if shortcut is None else shortcut(m, args[0])


def _row_major(t: torch.Tensor) -> bool:
    """Strides exactly those of a fresh tensor: kernels pick their output layout from the strides, including
    those of size-1 dims that `is_contiguous()` ignores."""
    stride = 1
    for size, step in zip(reversed(t.shape), reversed(t.stride()), strict=True):
        if step != stride:
            return False
        stride *= size
    return True


def _hooked(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
    )


def _layout_is_certain(m: nn.Module, x: torch.Tensor) -> bool:
    """The layer would output a fresh row-major tensor of x's dtype: a non-empty input matching its weight's dtype
    and device, both row-major, and no hook that could change what it returns."""
    return bool(
        x.numel()
        and x.dtype == m.weight.dtype
        and x.device == m.weight.device
        and _row_major(x)
        and _row_major(m.weight)
        and not _hooked(m)
    )


class ShapeProp(fx.Interpreter):
    """Record each node's `tensor_meta` and `type` on real inputs, as fx's ShapeProp does.

    Runs on the traced model and its graph (no GraphModule needed); a failing node raises `NodeFailed`
    instead of printing a traceback. With `shape_only`, plain conv, linear and eval batch-norm layers output zeros of the
    right shape rather than their values.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, *, shape_only: bool = False):
        super().__init__(root, graph=graph)
        self.shape_only = shape_only

    def propagate(self, *args: Any) -> Any:
        return self.run(*args)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        m = self.submodules.get(target)
        if m is None:  # a second path to a shared module: named_modules() lists each module once
            m = self.fetch_attr(target)
        if self.shape_only and not torch.is_grad_enabled():
            shape = _output_shape(m, args, kwargs)
            if shape is not None and _layout_is_certain(m, args[0]):
                return torch.zeros(shape, dtype=args[0].dtype, device=args[0].device)
        return m(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:  # Interpreter.run_node without its traceback bookkeeping, which costs more than the op on small nets
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            value = getattr(self, n.op)(n.target, args, kwargs)
        except Exception as exc:
            raise NodeFailed(n, exc) from exc
        found = False

        def meta_of(x: Any) -> Any:
            nonlocal found
            if not isinstance(x, torch.Tensor):
                return x
            found = True
            return tensor_meta(x)

        meta = fx.node.map_aggregate(value, meta_of)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(value)
        return value
