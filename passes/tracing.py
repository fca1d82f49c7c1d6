"""Symbolic tracing with errors that name the module and the construct that broke it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from atofx.errors import TraceError

LeafSpec = type | str | nn.Module


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

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (
            isinstance(m, self._leaf_types)
            or module_qualified_name in self._leaf_paths
            or id(m) in self._leaf_ids
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.path_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


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


def trace(
    model: nn.Module,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace `model` into a GraphModule; untraceable code raises `TraceError` with the fix."""
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        path = tracer.failed_in or "<root>"
        module = model.get_submodule(path) if path != "<root>" else model
        raise TraceError(
            f"torch.fx cannot trace module '{path}' ({type(module).__name__}): {_describe(exc)}. "
            f"Fix: keep it opaque with atofx.compile(..., leaf_modules=[{type(module).__name__}]) "
            f"(its channels are then pinned), or fix the branch with concrete_args={{...}}."
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)
