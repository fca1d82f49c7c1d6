"""ZIG inference: turn the dependency facts into zero-invariant groups and channel spaces.

Elements joined by a union form one ZIG. ZIGs that touch exactly the same tensors form one
`ChannelSpace` (a residual stream, a block's hidden width, a concat member): the controller
emits one bit per ZIG of every unpinned space. A ZIG with any pinned element is pinned.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .channel_layout import layouts_in
from .dependency import ChannelFacts, ParamSlice


@dataclass
class ChannelSpace:
    """A set of coupled channels; each of its `width` indices is one ZIG."""

    index: int
    name: str
    width: int
    pinned: bool
    reason: str | None
    producers: list[str]
    consumers: list[str]
    nodes: list[str]
    components: np.ndarray = field(repr=False)

    def __str__(self) -> str:
        state = f"pinned: {self.reason}" if self.pinned else "prunable"
        return f"ChannelSpace({self.name}, width={self.width}, {state})"


@dataclass
class ZIGSet:
    """The result of ZIG inference over one traced model."""

    spaces: list[ChannelSpace]
    labels: np.ndarray  # element id -> ZIG (component) id
    comp_space: np.ndarray  # ZIG id -> space index
    comp_pos: np.ndarray  # ZIG id -> index within its space
    slices: list[ParamSlice]
    facts: ChannelFacts

    @property
    def prunable(self) -> list[ChannelSpace]:
        return [s for s in self.spaces if not s.pinned]

    def keep_per_component(self, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean per ZIG id from one keep vector per space index (pinned and absent spaces keep all)."""
        out = np.ones(len(self.comp_space), dtype=bool)
        for index, bits in keep.items():
            out[self.spaces[index].components] = np.asarray(bits, dtype=bool)
        return out

    def dropped_indices(self, keep_comp: np.ndarray) -> dict[tuple[str, str, int], np.ndarray]:
        """(module, parameter, dim) -> sorted indices to remove, for every parameter slice."""
        removal: dict[tuple[str, str, int], np.ndarray] = {}
        for s in self.slices:
            drop = np.flatnonzero(~keep_comp[self.labels[s.ids]])
            key = (s.module, s.name, s.dim)
            removal[key] = np.union1d(removal[key], drop) if key in removal else drop
        return removal

    def zig_slices(self, space: int, zig: int, roles: tuple[str, ...] = ("out",)) -> list[tuple[str, str, int, np.ndarray]]:
        """(module, parameter, dim, indices) of one ZIG, for the given roles; each physical slice once."""
        comp = self.spaces[space].components[zig]
        found: dict[tuple[str, str, int, bytes], tuple[str, str, int, np.ndarray]] = {}
        for s in self.slices:
            if s.role in roles:
                idx = np.flatnonzero(self.labels[s.ids] == comp)
                if idx.size:
                    found.setdefault((s.module, s.name, s.dim, idx.tobytes()), (s.module, s.name, s.dim, idx))
        return list(found.values())


def _signature_hash(pairs_comp: np.ndarray, pairs_node: np.ndarray, n_comp: int, n_nodes: int) -> np.ndarray:
    rng = np.random.default_rng(0x5A16)
    node_keys = rng.integers(1, 2**62, size=n_nodes, dtype=np.int64).astype(np.uint64)
    sig = np.zeros(n_comp, dtype=np.uint64)
    np.add.at(sig, pairs_comp, node_keys[pairs_node])
    return sig


def _shared_slice_pairs(facts: ChannelFacts) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A parameter sliced twice along one dim (a layer called twice) indexes the same rows both times."""
    first: dict[tuple[str, str, int], np.ndarray] = {}
    a: list[np.ndarray] = []
    b: list[np.ndarray] = []
    for s in facts.slices:
        key = (s.module, s.name, s.dim)
        if key in first and len(first[key]) == len(s.ids):
            a.append(first[key])
            b.append(s.ids)
        first.setdefault(key, s.ids)
    return a, b


class _DistinctComponents:
    """ZIG ids present in an element-id array; most layouts share their input's array, so cache by identity."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        hit = self.cache.get(id(ids))
        if hit is None or hit[0] is not ids:
            hit = (ids, np.unique(self.labels[ids]))
            self.cache[id(ids)] = hit
        return hit[1]


def _unique_pairs(values: list[np.ndarray], n: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (row, value) pairs, sorted, for a list of arrays (row i = array i) or explicit rows."""
    if not values or not sum(len(v) for v in values):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    flat = np.concatenate(values)
    if rows is None:
        rows = np.repeat(np.arange(len(values)), [len(v) for v in values])
    keys = np.unique(rows.astype(np.int64) * n + flat)
    return keys // n, keys % n


def infer_zigs(facts: ChannelFacts) -> ZIGSet:
    """Group elements into ZIGs and ZIGs into channel spaces."""
    n = facts.n_elements
    a, b = facts.union_pairs()
    shared_a, shared_b = _shared_slice_pairs(facts)
    a, b = np.concatenate([a, *shared_a]), np.concatenate([b, *shared_b])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    n_comp, labels = connected_components(graph, directed=False)
    labels = labels.astype(np.int64)

    pin_reason = np.full(n_comp, -1, dtype=np.int64)
    if facts.pins:
        pin_ids = np.concatenate([p.ids for p in facts.pins])
        pin_idx = np.concatenate([np.full(len(p.ids), i) for i, p in enumerate(facts.pins)])
        order = np.argsort(pin_idx, kind="stable")[::-1]  # last write wins -> first pin's reason
        pin_reason[labels[pin_ids[order]]] = pin_idx[order]

    distinct = _DistinctComponents(labels)
    node_names: list[str] = []
    node_comps: list[np.ndarray] = []
    for name, lay in facts.layouts.items():
        lays = layouts_in(lay)
        if lays:
            node_names.append(name)
            comps = [distinct(x.ids) for x in lays]
            node_comps.append(comps[0] if len(comps) == 1 else np.unique(np.concatenate(comps)))
    pairs_node = np.repeat(np.arange(len(node_comps)), [len(c) for c in node_comps])
    pairs_comp = np.concatenate(node_comps)
    sig = _signature_hash(pairs_comp, pairs_node, n_comp, len(node_names))

    pinned = pin_reason >= 0
    sig ^= pinned.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    _, space_of_comp = np.unique(sig, return_inverse=True)
    space_of_comp = space_of_comp.ravel()
    # number spaces in order of their first ZIG (topological order of the graph)
    first = np.full(space_of_comp.max() + 1, n_comp, dtype=np.int64)
    np.minimum.at(first, space_of_comp, np.arange(n_comp))
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    comp_space = rank[space_of_comp]
    order = np.argsort(comp_space, kind="stable")
    bounds = np.searchsorted(comp_space[order], np.arange(len(first) + 1))
    comp_pos = np.empty(n_comp, dtype=np.int64)
    members = [order[bounds[i]:bounds[i + 1]] for i in range(len(first))]
    for comps in members:
        comp_pos[comps] = np.arange(len(comps))

    nodes_of_space: dict[int, list[str]] = defaultdict(list)
    n_space = len(members)
    for node, space in zip(*_unique_pairs([comp_space[pairs_comp]], n_space, rows=pairs_node), strict=True):
        nodes_of_space[int(space)].append(node_names[node])
    producers: dict[int, list[str]] = defaultdict(list)
    consumers: dict[int, list[str]] = defaultdict(list)
    slice_rows, slice_spaces = _unique_pairs([comp_space[distinct(x.ids)] for x in facts.slices], n_space)
    for row, space in zip(slice_rows, slice_spaces, strict=True):
        sl = facts.slices[row]
        target = producers if sl.role == "out" else consumers
        if sl.module not in target[int(space)]:
            target[int(space)].append(sl.module)

    spaces = []
    for i, comps in enumerate(members):
        reason_idx = pin_reason[comps[0]] if len(comps) else -1
        is_pinned = bool(pinned[comps].any())
        if is_pinned:
            reason_idx = int(pin_reason[comps][pin_reason[comps] >= 0].min())
        name = producers[i][0] if producers[i] else nodes_of_space[i][0]
        spaces.append(
            ChannelSpace(
                index=i,
                name=name,
                width=len(comps),
                pinned=is_pinned,
                reason=facts.pins[reason_idx].reason + f" (at {facts.pins[reason_idx].node})" if is_pinned else None,
                producers=producers[i],
                consumers=[c for c in consumers[i] if c not in producers[i]],
                nodes=nodes_of_space[i],
                components=comps,
            )
        )
    _dedupe_names(spaces)
    return ZIGSet(spaces, labels, comp_space, comp_pos, facts.slices, facts)


def _dedupe_names(spaces: list[ChannelSpace]) -> None:
    seen: dict[str, int] = defaultdict(int)
    for s in spaces:
        seen[s.name] += 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"
