"""Symbolic tracing with errors that name the module and the construct that broke it."""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from atofx.errors import TraceError

LeafSpec = type | str | nn.Module

# Argument types fx's Tracer.create_arg passes straight to TracerBase.create_arg after its checks for
# parameters, tensors, modules, named tuples and registered constant classes, none of which they can be.
_PLAIN_ARGS = frozenset({fx.Proxy, tuple, list, dict, int, float, bool, str, type(None)})


EVAL_IDENTITY = "atofx_eval_identity"  # node meta: a module kept as a call, the identity in eval mode


class _TrainingFlag:
    """Stands in for a module's `training` while tracing: to Python it is the module's mode (or False while the
    tracer probes eval mode); as an argument it becomes a read of the GraphModule's own `training`, so
    `F.dropout(x, p, self.training)` follows `.train()` and `.eval()` of the traced graph."""

    def __init__(self, tracer: _PathTracer, mode: bool) -> None:
        self.tracer, self.mode = tracer, mode

    def __bool__(self) -> bool:
        self.tracer.flag_reads += 1
        return self.mode and not self.tracer.probing_eval


class _PathTracer(fx.Tracer):
    """An fx Tracer that knows which submodule it is inside and keeps user leaf modules opaque."""

    def __init__(self, leaf_modules: Iterable[LeafSpec]):
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_paths = {x for x in leaves if isinstance(x, str)}
        self._leaf_ids = {id(x) for x in leaves if isinstance(x, nn.Module)}
        self.path_stack: list[str] = [""]
        self.failed_in: str | None = None  # innermost module whose forward raised
        self._param_names: dict[int, str] | None = None
        self.flag_reads = 0  # times Python branched on a training flag
        self.probing_eval = False
        self._mode_node: fx.Node | None = None
        self._param_cache: dict[str, Any] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (
            isinstance(m, self._leaf_types)
            or module_qualified_name in self._leaf_paths
            or id(m) in self._leaf_ids
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(
        self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None, type_expr: Any = None
    ) -> fx.Node:
        """The node alone: fx's Tracer also copies the module stack into every node's meta and keeps a scope
        table, which nothing in atofx reads (about 15% of tracing time on the mobile nets)."""
        return self.graph.create_node(kind, target, args, kwargs, name, type_expr)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace with every module's `training` replaced by a stand-in flag, restored afterwards."""
        modules = list(root.modules()) if isinstance(root, nn.Module) else []
        modes = [m.training for m in modules]
        for m, mode in zip(modules, modes, strict=True):
            m.training = _TrainingFlag(self, mode)
        try:
            return super().trace(root, concrete_args)
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.training = mode

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, _TrainingFlag):  # read at run time from the traced module: it follows .train() and .eval()
            if self._mode_node is None:
                self._mode_node = self.create_node("get_attr", "training", (), {})
            return self._mode_node
        if type(a) in _PLAIN_ARGS:  # the common case (a proxy, a tuple of them, a literal): skip those checks
            return fx.proxy.TracerBase.create_arg(self, a)
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's getattr, but a parameter's name is looked up instead of found by scanning every parameter."""
        if isinstance(attr_val, nn.Parameter):
            if self._param_names is None:  # named_parameters() gives each parameter once, by its first name
                self._param_names = {id(p): name for name, p in self.root.named_parameters()}
            name = self._param_names.get(id(attr_val))
            if name is not None:
                self._param_cache = parameter_proxy_cache  # a probe's erased nodes leave it
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.path_stack.append(self.path_of_module(m))
        reads, last = self.flag_reads, self.graph._root.prev
        try:
            out = super().call_module(m, forward, args, kwargs)
            if self.flag_reads == reads or not args or kwargs or not self.path_stack[-1]:
                return out
            if out is args[0] or self._eval_identity(m, forward, args):
                return self._as_call(last, args)
            return out
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


    def _eval_identity(self, m: nn.Module, forward: Any, args: tuple) -> bool:
        """Traced in train mode, is `m` the identity in eval mode? Its forward is traced again with every flag
        False; what that probe recorded is erased."""
        if not getattr(m.training, "mode", False) or self.probing_eval:
            return False
        last = self.graph._root.prev
        self.probing_eval = True
        try:
            probe = forward(*args)
        except Exception:  # the eval form does not trace: keep the train form
            probe = None
        finally:
            self.probing_eval = False
            self._erase_after(last, unused_only=False)
        return probe is args[0]

    def _erase_after(self, last: fx.Node, unused_only: bool = True) -> None:
        """Erase the nodes recorded after `last` (those nothing uses, with `unused_only`), newest first."""
        made = []
        node = self.graph._root.prev
        while node is not last:
            made.append(node)
            node = node.prev
        for node in made:
            if not unused_only or not node.users:
                self.graph.erase_node(node)
        gone = set(made) - set(self.graph.nodes)
        if self._mode_node in gone:
            self._mode_node = None
        for name, proxy in list(self._param_cache.items()):
            if proxy.node in gone:
                del self._param_cache[name]

    def _as_call(self, last: fx.Node, args: tuple) -> Any:
        """A module that branched on `self.training` and is the identity in eval mode (a drop-path): its
        train-mode work is not in the analysed graph, so it is kept as one call that runs its own forward."""
        self._erase_after(last)  # what its forward computed and nothing uses
        proxy = self.create_proxy("call_module", self.path_stack[-1], args, {})
        proxy.node.meta[EVAL_IDENTITY] = True
        return proxy


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


class _ShapeTracer(_PathTracer):
    """The path tracer run alongside the example input: every node's value is computed as it is recorded, so
    Python that needs a concrete number (an `if` on a size, `int(x.size(1))`, `math.ceil` of a padding, a
    tuple unpacked from `x.shape`) gets the example's; the graph is specialised to the example's shapes.

    Values computed from shapes only (`static`) may be made concrete; anything computed from a tensor's values
    may not: an `if` on it is data-dependent control flow, still refused. Inside a torch.nn layer subclass with
    its own forward (timm's Conv2dSame, MaxPool2dSame) shape arithmetic is folded into literals, so the padding
    it computes from the input size reaches the graph as numbers and the layer is analysed as a conv.
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec], example_inputs: tuple):
        super().__init__(leaf_modules)
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
        flag_reads = self.flag_reads
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
            self.flag_reads = flag_reads  # the example run's own reads are not the traced code's


def _is_layer_subclass(m: nn.Module) -> bool:
    """A user subclass of a torch.nn layer that replaces its forward (timm's Conv2dSame)."""
    cls = type(m)
    if cls.__module__.startswith("torch."):
        return False
    return any(base.__module__.startswith("torch.nn.modules") and base is not nn.Module
               and cls.forward is not base.forward for base in cls.__mro__[1:])


_CONSTRUCTS = (
    ("iterate", "iteration over a tensor of unknown length"),
    ("control flow", "data-dependent control flow (an `if`/`while` on a tensor value)"),
    ("len(", "len() of a tensor"),
    ("__bool__", "a tensor used as a Python bool"),
)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    for needle, construct in _CONSTRUCTS:
        if needle in text:
            return construct
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def trace_graph(
    model: nn.Module,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple | None = None,
) -> fx.Graph:
    """Trace `model` into a Graph whose targets are paths in `model`; untraceable code raises `TraceError`.

    Plain fx first; where it fails and `example_inputs` are given, again with the shapes of the example
    fixed (`_ShapeTracer`): branches and arithmetic on sizes then trace, branches on tensor values do not.
    """
    leaves = tuple(leaf_modules)
    tracer: _PathTracer = _PathTracer(leaves)
    try:
        return tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        failure = exc
    if example_inputs is not None:
        tracer = _ShapeTracer(leaves, tuple(example_inputs))
        try:
            return tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # still untraceable with the shapes fixed: report this failure
            failure = exc
    path = tracer.failed_in or "<root>"
    module = model.get_submodule(path) if path != "<root>" else model
    name = type(module).__name__
    fix = (f"keep it opaque with atofx.compile(..., leaf_modules=[{name}]) (its channels are then pinned)"
           if path != "<root>" else "move the branch into a submodule and keep that opaque with leaf_modules=[...]")
    shapes = ("" if example_inputs is not None else
              " Passing example_inputs to atofx.compile lets branches on input shapes trace.")
    raise TraceError(
        f"torch.fx cannot trace module '{path}' ({name}): {_describe(failure)}. Fix: {fix}, "
        f"or fix the branch with concrete_args={{...}}.{shapes}"
    ) from failure


def trace(
    model: nn.Module,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple | None = None,
) -> fx.GraphModule:
    """Trace `model` into a GraphModule; untraceable code raises `TraceError` with the fix."""
    graph = trace_graph(model, leaf_modules, concrete_args, example_inputs)
    return fx.GraphModule(model, graph, type(model).__name__)
