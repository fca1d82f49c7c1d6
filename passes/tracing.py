"""Symbolic tracing with errors that name the module and the construct that broke it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from atofx.errors import TraceError

from .path_tracer import EVAL_IDENTITY, LeafSpec, PathTracer
from .shape_tracer import ShapeTracer

__all__ = ["EVAL_IDENTITY", "LeafSpec", "trace", "trace_graph"]

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
    fixed (`ShapeTracer`): branches and arithmetic on sizes then trace, branches on tensor values do not.
    """
    leaves = tuple(leaf_modules)
    tracer: PathTracer = PathTracer(leaves)
    try:
        return tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        failure = exc
    if example_inputs is not None:
        tracer = ShapeTracer(leaves, tuple(example_inputs))
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
