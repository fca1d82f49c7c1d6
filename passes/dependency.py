"""The dependency pass: walk a shape-annotated graph and record how channels flow.

The engine of the analysis: for each node it looks the op up in the op table (`op_rules.OPS`), runs its
rule on a `RuleContext` and checks the layout the rule returns against the shapes shape propagation saw.
An op without a rule, or a rule whose answer does not fit, pins every channel it touches. The facts
(`ChannelFacts`) are what ZIG inference turns into zero-invariant groups.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from . import op_rules
from .channel_layout import ChannelLayout, layouts_in
from .path_tracer import DeclaredLeaves, LeafSpec
from .registry import OpTable
from .rule_context import ChannelFacts, RuleContext, output_shapes, tensor_shape
from .tracing import EVAL_IDENTITY


def describe_target(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module {type(root.get_submodule(str(node.target))).__name__} ('{node.target}')"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    mod = getattr(target, "__module__", None) or ""
    return f"function {mod + '.' if mod else ''}{getattr(target, '__name__', str(target))}"


def _fits(layout: Any, node: fx.Node) -> bool:
    """A rule's answer agrees with the shapes shape propagation saw."""
    if isinstance(layout, ChannelLayout):
        shape = tensor_shape(node)
        return shape is not None and layout.dim < len(shape) and shape[layout.dim] == layout.width
    if isinstance(layout, (tuple, list)):
        shapes = output_shapes(node)
        return shapes is not None and len(shapes) == len(layout) and all(
            lay is None or (s is not None and lay.dim < len(s) and s[lay.dim] == lay.width)
            for lay, s in zip(layout, shapes, strict=True)
        )
    return True


class ChannelDependencyPass:
    """Walks a graph whose nodes carry `tensor_meta` and returns its `ChannelFacts`.

    `root` owns the modules and parameters the graph names: a GraphModule (its own graph is walked)
    or the traced model with its `graph`; `ops` is the op table (`op_rules.OPS` unless given).
    """

    def __init__(self, root: nn.Module, graph: fx.Graph | None = None, ops: OpTable | None = None,
                 leaf_modules: Iterable[LeafSpec] = ()):
        self.root = root
        self.graph = graph if graph is not None else root.graph
        self.ops = op_rules.OPS if ops is None else ops
        self.declared = DeclaredLeaves(leaf_modules)  # opaque at the user's request: pinned, but not unknown

    def run(self) -> ChannelFacts:
        facts = ChannelFacts(aliases=tensor_aliases(self.root))
        modules = Submodules(self.root)
        for node in self.graph.nodes:
            module = modules(str(node.target)) if node.op == "call_module" else None
            ctx = RuleContext(node, self.root, facts, module)
            layout = self._visit(ctx)
            facts.layouts[node.name] = layout
            if isinstance(layout, ChannelLayout) and mutates_first_argument(node, module):
                _written_in_place(ctx, layout)
            if node.name not in facts.channel_counts:
                self._follow_counts(ctx)
            if layouts_in(layout):
                facts.graph_inputs[node.name] = _graph_inputs(node)
        return facts

    def _visit(self, ctx: RuleContext) -> Any:
        node = ctx.node
        if node.op == "placeholder":
            return ctx.fresh_like_output("model input")
        if node.op == "get_attr":
            return None
        if node.op == "output":
            ctx.pin_inputs("model output")
            return None
        if node.meta.get(EVAL_IDENTITY):  # a drop-path kept as a call: the identity in eval mode
            return ctx.layout(node.args[0])
        op = self.ops.for_node(node, ctx.module)
        if op is None or op.rule is None:
            what = describe_target(node, self.root)
            has_tensor_io = ctx.input_layouts() or ctx.out_shape is not None or output_shapes(node)
            if not has_tensor_io:
                return None
            declared = node.op == "call_module" and self.declared(ctx.module, str(node.target))
            if not declared:
                ctx.facts.unknown_ops[node.name] = what
            reason = f"kept opaque (leaf_modules): {what}" if declared else f"unknown op: {what}"
            ctx.pin_inputs(reason)
            return ctx.fresh_like_output(reason)
        out = op.rule(ctx)
        if not _fits(out, node):
            reason = f"rule '{op.kind}' could not follow the channels of {describe_target(node, self.root)}"
            ctx.facts.unknown_ops[node.name] = reason
            ctx.pin_inputs(reason)
            return ctx.fresh_like_output(reason)
        return out

    def _follow_counts(self, ctx: RuleContext) -> None:
        """A channel count read off a tensor (`x.size(1)`) stays one through arithmetic on numbers and may size a
        reshape, where it follows the pruned width; anything else it reaches (a tensor divided by it, the model's
        output) would see another number once channels go: those channels are pinned."""
        node, facts = ctx.node, ctx.facts
        counted = [ids for n in node.all_input_nodes for ids in _counted(facts.channel_counts.get(n.name))]
        if not counted:
            return
        ids = np.unique(np.concatenate(counted))
        if node.op != "output" and not ctx.input_layouts() and ctx.out_shape is None and output_shapes(node) is None:
            ctx.counts(ids)  # arithmetic on numbers: still a count
            return
        op = self.ops.for_node(node, ctx.module) if node.op != "output" else None
        if op is None or not op.takes_sizes:
            what = "the model output" if node.op == "output" else describe_target(node, self.root)
            ctx.pin(ids, f"its channel count (x.shape, x.size()) is used as a number by {what}")


_IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})
# ops whose result may share its input's memory: writing into it writes into the tensor it was taken from
_VIEWS = frozenset({"getitem", "view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
                    "expand", "expand_as", "narrow", "split", "chunk", "unbind", "select", "contiguous", "to", "float",
                    "type_as", "detach", "t", "movedim", "swapaxes", "view_as", "reshape_as", "as_strided", "getattr"})


def mutates_first_argument(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether `node` writes its result into its first argument (`y.add_(1)`, `y += 1`, `F.relu(y, inplace=True)`,
    `nn.ReLU(inplace=True)`): the tensor it was given then holds the result for every later reader."""
    if node.op == "call_module":
        return getattr(module, "inplace", False) is True
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        if node.target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return True
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return name.endswith("_") and not name.startswith("_")


def _written_in_place(ctx: RuleContext, result: ChannelLayout) -> None:
    """Later readers of the tensor an in-place op wrote into read its result. Where that tensor may be a view of
    another (a slice, a reshape), the other changes too, out of sight: the channels it made non-zero are pinned."""
    target = ctx.arg(0, "input")
    before = ctx.layout(target)
    if before is None or before.width != result.width:
        return
    ctx.facts.layouts[target.name] = result.at(before.dim)
    lost = before.zero & ~result.zero
    name = getattr(target.target, "__name__", str(target.target))
    if lost.any() and target.op in ("call_method", "call_function") and name in _VIEWS:
        ctx.pin(before.ids[lost], f"written in place through a view, where a dropped channel becomes non-zero ({name})")


def _counted(value: Any) -> list[np.ndarray]:
    if isinstance(value, tuple):
        return [ids for ids in value if ids is not None]
    return [] if value is None else [value]


def tensor_aliases(root: nn.Module) -> dict[str, str]:
    """Every further name of a parameter or buffer reachable by several names -> its first name (the one
    `named_parameters()` lists)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        known = first.setdefault(id(t), name)
        if known != name:
            aliases[name] = known
    return aliases


def _graph_inputs(node: fx.Node) -> list[str]:
    """The nodes whose tensors feed `node` (for getitem, the indexed value only)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return [src.name for src in node.all_input_nodes if src is node.args[0]]
    return [src.name for src in node.all_input_nodes]


class Submodules:
    """`root.get_submodule(path)` through one table of `root.named_modules()`: a walk per lookup costs more."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.table = dict(root.named_modules())

    def __call__(self, path: str) -> nn.Module:
        found = self.table.get(path)
        return found if found is not None else self.root.get_submodule(path)  # a second path to a shared module
