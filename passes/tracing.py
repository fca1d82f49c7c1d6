"""Symbolic tracing with errors that name the module and the construct that broke it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from atofx.errors import TraceError

LeafSpec = type | str | nn.Module

# Argument types fx's Tracer.create_arg passes straight to TracerBase.create_arg after its checks for
# parameters, tensors, modules, named tuples and registered constant classes, none of which they can be.
_PLAIN_ARGS = frozenset({fx.Proxy, tuple, list, dict, int, float, bool, str, type(None)})


EVAL_IDENTITY = "atofx_eval_identity"  # node meta: a module kept as a call, the identity in eval mode


class _TrainingFlag:
    """Stands in for every module's `training` while tracing: False to Python (the graph is the eval one), and
    an argument that follows the traced module's own mode (`F.dropout(x, p, self.training)` stays a dropout)."""

    def __init__(self) -> None:
        self.reads = 0  # times Python branched on it

    def __bool__(self) -> bool:
        self.reads += 1
        return False


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
        self.flag = _TrainingFlag()
        self._mode_node: fx.Node | None = None

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
        """Trace with every module's `training` replaced by the flag, restored afterwards."""
        modules = list(root.modules()) if isinstance(root, nn.Module) else []
        modes = [m.training for m in modules]
        for m in modules:
            m.training = self.flag
        try:
            return super().trace(root, concrete_args)
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.training = mode

    def create_arg(self, a: Any) -> Any:
        if a is self.flag:  # read at run time from the traced module: it follows .train() and .eval()
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
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.path_stack.append(self.path_of_module(m))
        reads, last = self.flag.reads, self.graph._root.prev
        try:
            out = super().call_module(m, forward, args, kwargs)
            if self.flag.reads > reads and args and out is args[0] and not kwargs and self.path_stack[-1]:
                return self._as_call(last, args)
            return out
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


    def _as_call(self, last: fx.Node, args: tuple) -> Any:
        """A module that branched on `self.training` and is the identity in eval mode (a drop-path): its
        train-mode work is lost to the eval trace, so it is kept as one call that runs its own forward."""
        made = []
        node = self.graph._root.prev
        while node is not last:
            made.append(node)
            node = node.prev
        for node in made:  # newest first: what the identity forward computed and never used
            if not node.users:
                self.graph.erase_node(node)
        proxy = self.create_proxy("call_module", self.path_stack[-1], args, {})
        proxy.node.meta[EVAL_IDENTITY] = True
        return proxy


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
) -> fx.Graph:
    """Trace `model` into a Graph whose targets are paths in `model`; untraceable code raises `TraceError`."""
    tracer = _PathTracer(leaf_modules)
    try:
        return tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        path = tracer.failed_in or "<root>"
        module = model.get_submodule(path) if path != "<root>" else model
        raise TraceError(
            f"torch.fx cannot trace module '{path}' ({type(module).__name__}): {_describe(exc)}. "
            f"Fix: keep it opaque with atofx.compile(..., leaf_modules=[{type(module).__name__}]) "
            f"(its channels are then pinned), or fix the branch with concrete_args={{...}}."
        ) from exc


def trace(
    model: nn.Module,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace `model` into a GraphModule; untraceable code raises `TraceError` with the fix."""
    return fx.GraphModule(model, trace_graph(model, leaf_modules, concrete_args), type(model).__name__)
