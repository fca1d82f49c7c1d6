"""The path tracer: an fx Tracer that records which submodule each node comes from, keeps user leaf modules
opaque and follows a module's `training` flag into the graph."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

LeafSpec = type | str | nn.Module

# Argument types fx's Tracer.create_arg passes straight to TracerBase.create_arg after its checks for
# parameters, tensors, modules, named tuples and registered constant classes, none of which they can be.
_PLAIN_ARGS = frozenset({fx.Proxy, tuple, list, dict, int, float, bool, str, type(None)})


EVAL_IDENTITY = "atofx_eval_identity"  # node meta: a module kept as a call, the identity in eval mode
# output node meta: the modules whose Python branches on `training` left a graph that differs between the modes
MODE_BRANCHES = "atofx_mode_branches"


class DeclaredLeaves:
    """The modules a user asked to keep opaque (`leaf_modules`): classes, qualified paths or instances."""

    def __init__(self, leaf_modules: Iterable[LeafSpec]) -> None:
        leaves = list(leaf_modules)
        self._types = tuple(x for x in leaves if isinstance(x, type))
        self._paths = {x for x in leaves if isinstance(x, str)}
        self._ids = {id(x) for x in leaves if isinstance(x, nn.Module)}

    def __call__(self, m: nn.Module, path: str) -> bool:
        return isinstance(m, self._types) or path in self._paths or id(m) in self._ids


class _TrainingFlag:
    """Stands in for a module's `training` while tracing: to Python it is the module's mode (or False while the
    tracer probes eval mode); as an argument it becomes a read of the GraphModule's own `training`, so
    `F.dropout(x, p, self.training)` follows `.train()` and `.eval()` of the traced graph."""

    def __init__(self, tracer: PathTracer, mode: bool, module: nn.Module) -> None:
        self.tracer, self.mode, self.module = tracer, mode, module

    def __bool__(self) -> bool:
        self.tracer.readers.append(self.module)
        return self.mode and not self.tracer.probing_eval


class PathTracer(fx.Tracer):
    """An fx Tracer that knows which submodule it is inside and keeps user leaf modules opaque."""

    def __init__(self, leaf_modules: Iterable[LeafSpec], flip_modes: bool = False):
        """`flip_modes`: trace every module as if in the other mode (what `mode_branches` compares against)."""
        super().__init__()
        self.flip_modes = flip_modes
        self.readers: list[nn.Module] = []  # whose `training` Python branched on, but in modules kept as calls
        self.declared = DeclaredLeaves(leaf_modules)
        self.path_stack: list[str] = [""]
        self.failed_in: str | None = None  # innermost module whose forward raised
        self._param_names: dict[int, str] | None = None
        self.probing_eval = False
        self._mode_node: fx.Node | None = None
        self._param_cache: dict[str, Any] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.declared(m, module_qualified_name) or super().is_leaf_module(m, module_qualified_name)

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
            m.training = _TrainingFlag(self, mode != self.flip_modes, m)
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
        reads, last = len(self.readers), self.graph._root.prev
        try:
            out = super().call_module(m, forward, args, kwargs)
            if len(self.readers) == reads or not args or kwargs or not self.path_stack[-1]:
                return out
            if out is args[0] or self._eval_identity(m, forward, args):
                del self.readers[reads:]  # its branch runs as its own forward, in either mode
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
