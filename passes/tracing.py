"""Symbolic tracing with errors that name the module and the construct that broke it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from atofx.errors import TraceError

from .path_tracer import EVAL_IDENTITY, MODE_BRANCHES, LeafSpec, PathTracer
from .shape_tracer import ShapeTracer

__all__ = ["EVAL_IDENTITY", "MODE_BRANCHES", "LeafSpec", "mode_branches", "trace", "trace_graph"]

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
    makers: list[Callable[[bool], PathTracer]] = [lambda flip: PathTracer(leaves, flip)]
    if example_inputs is not None:  # if plain fx fails: again with the shapes fixed
        makers.append(lambda flip: ShapeTracer(leaves, tuple(example_inputs), flip))
    for make in makers:
        tracer = make(False)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # fx raises many types; all mean "cannot trace"
            failure = exc
            continue
        if tracer.readers:
            _mark_mode_branches(model, graph, tracer.readers, make(True), concrete_args)
        return graph
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


def _mark_mode_branches(model: nn.Module, graph: fx.Graph, readers: list[nn.Module], other_mode: PathTracer,
                        concrete_args: dict[str, Any] | None) -> None:
    """Python branched on `training` outside the modules kept as calls: fx records the branch of the model's mode
    only. Where the graph of the other mode differs (or does not trace), the output node's meta names the
    modules that read their flag (`MODE_BRANCHES`); a graph the same in both modes is not marked."""
    code = graph.python_code("self").src
    try:
        same = other_mode.trace(model, concrete_args).python_code("self").src == code
    except Exception:  # the other mode's branch does not even trace
        same = False
    if not same:
        names = {id(m): path for path, m in model.named_modules()}
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        output.meta[MODE_BRANCHES] = tuple(dict.fromkeys(names.get(id(m), "?") for m in readers))


def mode_branches(graph: fx.Graph) -> tuple[str, ...]:
    """The module paths ("" for the model itself) whose branch on `training` makes `graph` one mode's only."""
    output = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    return output.meta.get(MODE_BRANCHES, ()) if output is not None else ()


def trace(
    model: nn.Module,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple | None = None,
) -> fx.GraphModule:
    """Trace `model` into a GraphModule; untraceable code raises `TraceError` with the fix."""
    graph = trace_graph(model, leaf_modules, concrete_args, example_inputs)
    return fx.GraphModule(model, graph, type(model).__name__)
