"""The shape-specialising tracer: the path tracer run beside the example input, so Python that needs a size
(an `if` on a shape, `int()` of a size, TF-style 'SAME' padding) traces with the example's shapes fixed."""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .path_tracer import LeafSpec, PathTracer


class _ShapeProxy(fx.Proxy):
    """A proxy whose Python number conversions answer from the example input, where the value is a shape."""

    def __len__(self) -> int:
        n = self.tracer.fixed_length(self.node)
        return n if n is not None else len(self.tracer.concrete(self, "len() of a tensor"))

    def __int__(self) -> int:
        return int(self.tracer.concrete(self, "int() of a tensor value"))

    def __float__(self) -> float:
        return float(self.tracer.concrete(self, "float() of a tensor value"))

    def __ceil__(self) -> int:
        return math.ceil(self.tracer.concrete(self, "math.ceil() of a tensor value"))

    def __floor__(self) -> int:
        return math.floor(self.tracer.concrete(self, "math.floor() of a tensor value"))

    def __trunc__(self) -> int:
        return math.trunc(self.tracer.concrete(self, "math.trunc() of a tensor value"))

    def __round__(self, ndigits: int | None = None) -> Any:
        return round(self.tracer.concrete(self, "round() of a tensor value"), ndigits)


_SHAPE_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement"})
# ops that cut a tensor into a tuple along `dim` (default 0): where `dim` is in their arguments
_SPLIT_DIM_AT = {"chunk": 2, "split": 2, "tensor_split": 2, "unbind": 1, "split_with_sizes": 2}
_SHAPE_ATTRS = frozenset({"shape", "ndim"})


class ShapeTracer(PathTracer):
    """The path tracer run alongside the example input: every node's value is computed as it is recorded, so
    Python that needs a concrete number (an `if` on a size, `int(x.size(1))`, `math.ceil` of a padding, a
    tuple unpacked from `x.shape`) gets the example's; the graph is specialised to the example's shapes.

    Values computed from shapes only (`static`) may be made concrete; anything computed from a tensor's values
    may not: an `if` on it is data-dependent control flow, still refused. Inside a torch.nn layer subclass with
    its own forward (timm's Conv2dSame, MaxPool2dSame) shape arithmetic is folded into literals, so the padding
    it computes from the input size reaches the graph as numbers and the layer is analysed as a conv.
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec], example_inputs: tuple, flip_modes: bool = False):
        super().__init__(leaf_modules, flip_modes)
        self.inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]  # in-place ops
        self.values: dict[fx.Node, Any] = {}
        self.static: set[fx.Node] = set()
        self._fold = 0
        self._evaluating = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self._evaluate(node)
        return node

    def create_arg(self, a: Any) -> Any:
        if self._fold and isinstance(a, fx.Proxy) and a.node in self.static:
            return super().create_arg(self.values[a.node])
        return super().create_arg(a)

    def concrete(self, proxy: fx.Proxy, what: str) -> Any:
        """The example's value of a shape-derived proxy; a value computed from tensor data cannot be fixed."""
        if proxy.node in self.static:
            return self.values[proxy.node]
        raise fx.proxy.TraceError(f"{what}: data-dependent control flow")

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "a Python branch on a tensor's values"))

    def fixed_length(self, node: fx.Node) -> int | None:
        """The length of a sequence the example's shapes fix: a shape tuple, or a torch op's tuple of tensors
        computed from tensors and shapes (`x.chunk(2, 1)`, `x.split(4, 1)`); None for anything else (a tensor,
        or a split of the batch dim, whose count would follow the example's batch size)."""
        value = self.values.get(node)
        fixed = node in self.static or (node.op in ("call_function", "call_method") and all(
            n in self.static or isinstance(self.values.get(n), torch.Tensor) for n in node.all_input_nodes))
        if not fixed or not isinstance(value, (tuple, list)):
            return None
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name in _SPLIT_DIM_AT:
            at, source = _SPLIT_DIM_AT[name], self.values.get(node.args[0]) if node.args else None
            dim = node.kwargs.get("dim", node.args[at] if len(node.args) > at else 0)
            if not isinstance(source, torch.Tensor) or not isinstance(dim, int) or dim % max(source.ndim, 1) == 0:
                return None
        return len(value)

    def iter(self, obj: fx.Proxy) -> Any:
        n = self.fixed_length(obj.node)
        if n is not None:  # `list(x.chunk(2, 1))`, `for part in x.split(4, 1)`
            return iter([obj[i] for i in range(n)])
        return super().iter(obj)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:  # a parameter read while computing a value: the tensor itself
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:  # computing a value for the example: fx's patched Module.__call__ must not record it
            return forward(*args, **kwargs)
        resolved = _is_layer_subclass(m) and not self.is_leaf_module(m, self.path_of_module(m))
        self._fold += resolved
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._fold -= resolved

    def _evaluate(self, node: fx.Node) -> None:
        """Compute `node` on the example's values (no autograd, modules in eval mode); a node that cannot be
        computed keeps no value, and neither does anything after it that reads it."""
        if node.op == "placeholder":
            index = sum(1 for n in self.values if n.op == "placeholder")
            if index < len(self.inputs):
                self.values[node] = self.inputs[index]
            elif node.args:
                self.values[node] = node.args[0]
            return
        if node is self._mode_node:
            self.values[node] = False
            return
        if node.op == "output":  # the graph's result: no value of its own
            return
        try:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.values.__getitem__)
        except KeyError:
            return
        try:
            value = self._run(node, args, kwargs)
        except Exception:  # noqa: BLE001 - a value that cannot be computed here is only not known
            return
        self.values[node] = value
        inputs = node.all_input_nodes  # none: computed from literals (shapes folded in a layer subclass)
        shape_query = (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
            node.target is builtins.getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS)
        if not isinstance(value, torch.Tensor) and (shape_query or (
                node.op in ("call_function", "call_method") and all(n in self.static for n in inputs))):
            self.static.add(node)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace, then drop the shape arithmetic whose results were folded into literals."""
        graph = super().trace(root, concrete_args)
        for node in reversed(graph.nodes):
            if node in self.static and not node.users:
                graph.erase_node(node)
        return graph

    def _run(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        readers = len(self.readers)
        modes = []
        self._evaluating = True
        try:
            with torch.no_grad():
                if node.op == "get_attr":
                    value = self.root
                    for part in str(node.target).split("."):
                        value = getattr(value, part)
                    return value
                if node.op == "call_module":
                    module = self.root.get_submodule(str(node.target))
                    modes = [(m, m.training) for m in module.modules()]
                    for m, _ in modes:
                        m.training = False
                    return module(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return node.target(*args, **kwargs)  # call_function: `_evaluate` leaves out the output node
        finally:
            self._evaluating = False
            for m, mode in modes:
                m.training = mode
            del self.readers[readers:]  # the example run's own reads are not the traced code's


def _is_layer_subclass(m: nn.Module) -> bool:
    """A user subclass of a torch.nn layer that replaces its forward (timm's Conv2dSame)."""
    cls = type(m)
    if cls.__module__.startswith("torch."):
        return False
    return any(base.__module__.startswith("torch.nn.modules") and base is not nn.Module
               and cls.forward is not base.forward for base in cls.__mro__[1:])
