"""Symbolic tracing with errors that name the module and the construct that broke it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from atofx.errors import TraceError

from .path_tracer import EVAL_IDENTITY, MODE_BRANCHES, LeafSpec, PathTracer
from .shape_tracer import ShapeTracer

__all__ = ["EVAL_IDENTITY", "MODE_BRANCHES", "LeafSpec", "branching_modules", "mode_branches", "trace", "trace_graph"]

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
    only. The graph of the other mode is traced too: where the two differ only in flags that are the mode itself
    (timm's BatchNormAct2d: `batch_norm(..., True if self.training else ...)`), those flags become reads of the
    graph's `training` and the graph follows the mode; where they differ otherwise (or the other mode does not
    trace), the output node's meta names the modules that read their flag (`MODE_BRANCHES`)."""
    try:
        other = other_mode.trace(model, concrete_args)
    except Exception:  # the other mode's branch does not even trace
        other = None
    flags = _mode_flags(graph, other, model.training) if other is not None else None
    if flags is None:
        names = {id(m): path for path, m in model.named_modules()}
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        output.meta[MODE_BRANCHES] = tuple(dict.fromkeys(names.get(id(m), "?") for m in readers))
        return
    if flags:
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            training = graph.get_attr("training")
        for node, key in flags:
            node.update_arg(key, training) if isinstance(key, int) else node.update_kwarg(key, training)


def _mode_flags(graph: fx.Graph, other: fx.Graph, mode: bool) -> list[tuple[fx.Node, int | str]] | None:
    """The arguments of `graph` (traced in `mode`) that are `mode` where `other` has `not mode`, node by node; None
    if the graphs differ in anything else."""
    nodes, others = list(graph.nodes), list(other.nodes)
    if len(nodes) != len(others):
        return None
    flags: list[tuple[fx.Node, int | str]] = []
    for a, b in zip(nodes, others, strict=True):
        if (a.op, a.target, a.name, len(a.args), set(a.kwargs)) != (b.op, b.target, b.name, len(b.args), set(b.kwargs)):
            return None
        pairs = [*enumerate(zip(a.args, b.args, strict=True)), *((k, (a.kwargs[k], b.kwargs[k])) for k in a.kwargs)]
        for key, (x, y) in pairs:
            x, y = (fx.node.map_arg(v, lambda n: n.name) for v in (x, y))
            if x == y:
                continue
            if x is not mode or y is not (not mode):
                return None
            flags.append((a, key))
    return flags


def branching_modules(model: nn.Module, graph: fx.Graph) -> str:
    """The modules of `mode_branches`, as a message names them ("'layer1.bn', Net.forward"); "" if none."""
    return ", ".join(f"'{b}'" if b else f"{type(model).__name__}.forward" for b in mode_branches(graph))


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
