"""The vocabulary of the op rules: what a rule sees of one node, and the facts it reports.

`RuleContext` is the rule's view of one fx node (its arguments, their channel layouts and shapes);
through it a rule records into the shared `ChannelFacts` which elements go together (unions), which
can never go (pins), which parameter slices belong to which elements, and how the node's FLOPs scale.
The engine (`dependency.py`) and the table (`op_rules.py`) both import this module; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .channel_layout import ChannelLayout, layouts_in

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
    # node -> the element ids a value counts (`x.size(1)`: x's channels; `x.shape`: per position), None for none
    channel_counts: dict[str, Any] = field(default_factory=dict)
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

    def counts(self, ids: Any) -> None:
        """This node's value is a number of channels (`ids`: the element ids counted; a tuple of them, or of None,
        for a shape; None: it counts none), not a tensor."""
        self.facts.channel_counts[self.name] = ids


def default_channel_dim(shape: torch.Size) -> int:
    return 1 if len(shape) >= 2 else 0

