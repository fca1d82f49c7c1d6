"""The dependency pass: walk a shape-annotated graph and record how channels flow.

For each tensor it assigns a `ChannelLayout` using the op rule table, and it collects the
facts ZIG inference needs: which elements must go together (unions), which can never go
(pins, with the reason), and which parameter slices belong to which elements. The pass also
builds a networkx graph with one node per (fx node, channel dim).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .channel_layout import ChannelLayout, layouts_in
from .tracing import EVAL_IDENTITY

Role = Literal["out", "in"]


@dataclass(frozen=True)
class ParamSlice:
    """One dim of one parameter or buffer, indexed by channel position.

    role "out": part of the ZIG (zeroing it zeroes the channel); "in": read by a consumer,
    removed with the channel but irrelevant to zero-invariance.
    """

    module: str
    name: str
    dim: int
    ids: np.ndarray
    role: Role
    node: str


@dataclass(frozen=True)
class Pin:
    ids: np.ndarray
    node: str
    reason: str


@dataclass
class NodeFlops:
    """How a FLOPs-counted op scales with the channels kept at its input and output."""

    node: str
    scaling: Literal["in*out", "out", "const"]
    input: str | None = None
    share: float = 1.0  # the part of the node's FLOPs that scales; the rest is constant


@dataclass
class ChannelFacts:
    """Everything the dependency pass learns about one graph."""

    n_elements: int = 0
    layouts: dict[str, Any] = field(default_factory=dict)  # node name -> layout | tuple | None
    slices: list[ParamSlice] = field(default_factory=list)
    pins: list[Pin] = field(default_factory=list)
    unknown_ops: dict[str, str] = field(default_factory=dict)  # node name -> op description
    flops: dict[str, NodeFlops] = field(default_factory=dict)
    literal_channel_args: dict[str, str] = field(default_factory=dict)  # node -> what is hard-coded
    graph_inputs: dict[str, list[str]] = field(default_factory=dict)  # node with a layout -> nodes feeding it
    aliases: dict[str, str] = field(default_factory=dict)  # second name of a shared tensor -> its first name
    group_norms: dict[str, np.ndarray] = field(default_factory=dict)  # GroupNorm path -> element ids of its input
    contractions: list[str] = field(default_factory=list)  # products summing over their first argument's channels
    _graph: nx.DiGraph | None = None
    _union_a: list[np.ndarray] = field(default_factory=list)
    _union_b: list[np.ndarray] = field(default_factory=list)

    @property
    def graph(self) -> nx.DiGraph:
        """One node per (fx node, channel dim), an edge where one feeds another; built on first use (pictures)."""
        if self._graph is None:
            self._graph = nx.DiGraph()
            for name, inputs in self.graph_inputs.items():
                lays = layouts_in(self.layouts[name])
                self._graph.add_node((name, lays[0].dim), fx_node=name, width=sum(x.width for x in lays))
                for src in inputs:
                    src_lays = layouts_in(self.layouts.get(src))
                    if src_lays:
                        self._graph.add_edge((src, src_lays[0].dim), (name, lays[0].dim))
        return self._graph

    def tensor_name(self, module: str, name: str) -> str:
        """The first name of the parameter or buffer `module.name`: one tensor shared by two modules has one."""
        full = f"{module}.{name}" if module else name
        return self.aliases.get(full, full)

    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self.n_elements, self.n_elements + n, dtype=np.int64)
        self.n_elements += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        if a.size:
            self._union_a.append(a.ravel())
            self._union_b.append(b.ravel())

    def union_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._union_a:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        return np.concatenate(self._union_a), np.concatenate(self._union_b)


def tensor_shape(node: Any) -> torch.Size | None:
    """Static shape of a node's tensor value from shape propagation, or None."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def output_shapes(node: fx.Node) -> list[torch.Size | None] | None:
    """Shapes of a node that returns a tuple or list of tensors."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)):
        return [getattr(m, "shape", None) for m in meta]
    return None


def iter_nodes(value: Any):
    """Every fx Node inside nested args."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


@dataclass
class RuleContext:
    """What a rule sees of one node, and how it reports what it learns."""

    node: fx.Node
    root: nn.Module
    facts: ChannelFacts
    module: nn.Module | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def out_shape(self) -> torch.Size | None:
        return tensor_shape(self.node)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def layout(self, value: Any) -> ChannelLayout | None:
        if isinstance(value, fx.Node):
            lay = self.facts.layouts.get(value.name)
            return lay if isinstance(lay, ChannelLayout) else None
        return None

    def shape(self, value: Any) -> torch.Size | None:
        return tensor_shape(value)

    def input_layouts(self) -> list[ChannelLayout]:
        return [x for n in iter_nodes((self.node.args, self.node.kwargs))
                for x in layouts_in(self.facts.layouts.get(n.name))]

    def pin(self, ids: np.ndarray, reason: str) -> None:
        if len(ids):
            self.facts.pins.append(Pin(np.asarray(ids, dtype=np.int64), self.name, reason))

    def pin_inputs(self, reason: str) -> None:
        for lay in self.input_layouts():
            self.pin(lay.ids, reason)

    def fresh(self, dim: int, width: int, *, pinned: str | None = None, zero: bool = True) -> ChannelLayout:
        ids = self.facts.fresh(width)
        if pinned:
            self.pin(ids, pinned)
        return ChannelLayout(dim, ids, np.full(width, zero))

    def fresh_like_output(self, reason: str) -> Any:
        """Pinned fresh layouts for whatever tensors this node returns."""
        shape = self.out_shape
        if shape is not None:
            return self._fresh_pinned(shape, reason)
        shapes = output_shapes(self.node)
        if shapes is not None:
            return tuple(self._fresh_pinned(s, reason) if s is not None else None for s in shapes)
        return None

    def _fresh_pinned(self, shape: torch.Size, reason: str) -> ChannelLayout:
        # keep the channel dim of an input of the same rank, so later ops line up with it
        dim = default_channel_dim(shape)
        for lay in self.input_layouts():
            if lay.dim < len(shape) and lay.width == shape[lay.dim]:
                dim = lay.dim
                break
        width = int(shape[dim]) if len(shape) else 1
        return self.fresh(dim, width, pinned=reason, zero=False)

    def param_slice(self, owner: str, name: str, dim: int, ids: np.ndarray, role: Role) -> None:
        self.facts.slices.append(ParamSlice(owner, name, dim, np.asarray(ids, dtype=np.int64), role, self.name))

    def attr_path(self, value: Any) -> tuple[str, str, bool] | None:
        """(owner module, attribute, is_parameter) when `value` is a get_attr node."""
        if isinstance(value, fx.Node) and value.op == "get_attr":
            owner, _, attr = str(value.target).rpartition(".")
            mod = self.root.get_submodule(owner) if owner else self.root
            return owner, attr, isinstance(getattr(mod, attr, None), nn.Parameter)
        return None

    def counts_flops(self, scaling: Literal["in*out", "out", "const"], input: Any = None, share: float = 1.0) -> None:
        src = input.name if isinstance(input, fx.Node) else None
        self.facts.flops[self.name] = NodeFlops(self.name, scaling, src, share)

    def literal_channels(self, what: str) -> None:
        self.facts.literal_channel_args[self.name] = what


def default_channel_dim(shape: torch.Size) -> int:
    return 1 if len(shape) >= 2 else 0


def channel_width(shape: torch.Size) -> int:
    return int(shape[default_channel_dim(shape)]) if len(shape) else 1


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
    or the traced model with its `graph`.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph | None = None, rules: Any = None):
        from .op_rules import RULES, lookup_rule

        self.root = root
        self.graph = graph if graph is not None else root.graph
        self.rules = RULES if rules is None else rules
        self._lookup = lookup_rule

    def run(self) -> ChannelFacts:
        facts = ChannelFacts(aliases=tensor_aliases(self.root))
        modules = Submodules(self.root)
        for node in self.graph.nodes:
            module = modules(str(node.target)) if node.op == "call_module" else None
            layout = self._visit(RuleContext(node, self.root, facts, module))
            facts.layouts[node.name] = layout
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
        rule = self._lookup(self.rules, node, ctx.module)
        if rule is None:
            what = describe_target(node, self.root)
            has_tensor_io = ctx.input_layouts() or ctx.out_shape is not None or output_shapes(node)
            if not has_tensor_io:
                return None
            ctx.facts.unknown_ops[node.name] = what
            reason = f"unknown op: {what}"
            ctx.pin_inputs(reason)
            return ctx.fresh_like_output(reason)
        out = rule.propagate(ctx)
        if not _fits(out, node):
            reason = f"rule '{rule.kind}' could not follow the channels of {describe_target(node, self.root)}"
            ctx.facts.unknown_ops[node.name] = reason
            ctx.pin_inputs(reason)
            return ctx.fresh_like_output(reason)
        return out


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
