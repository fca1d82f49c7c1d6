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
from .rule_context import ChannelFacts, ParamSlice


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
    """A tensor sliced twice along one dim (a layer called twice, a weight shared by two layers) indexes the same
    rows both times."""
    first: dict[tuple[str, int], np.ndarray] = {}
    a: list[np.ndarray] = []
    b: list[np.ndarray] = []
    for s in facts.slices:
        key = (facts.tensor_name(s.module, s.name), s.dim)
        if key in first and len(first[key]) == len(s.ids):
            a.append(first[key])
            b.append(s.ids)
        first.setdefault(key, s.ids)
    return a, b


def _distinct(values: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """The distinct entries of `values` (ints below len(slot)), in no set order; O(len(values)), no sort."""
    pos = np.arange(len(values))
    slot[values] = pos  # one position per value survives
    return values[slot[values] == pos]


class _Distinct:
    """Distinct entries of `table[ids]` per index array, cached by identity: most layouts share their input's array."""

    def __init__(self, table: np.ndarray, n_values: int):
        self.table = table
        self.slot = np.empty(n_values, dtype=np.int64)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        hit = self.cache.get(id(ids))
        if hit is None or hit[0] is not ids:
            hit = (ids, _distinct(self.table[ids], self.slot))
            self.cache[id(ids)] = hit
        return hit[1]

    def of_all(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Distinct entries over several arrays."""
        parts = [self(ids) for ids in arrays]
        return parts[0] if len(parts) == 1 else _distinct(np.concatenate(parts), self.slot)


def _rows_per_space(row_spaces: list[np.ndarray], n_space: int) -> list[list[int]]:
    """For each space, the rows (indices into `row_spaces`, each an array of distinct spaces) holding it, ascending."""
    n_rows = len(row_spaces)
    if not n_rows:
        return [[] for _ in range(n_space)]
    rows = np.repeat(np.arange(n_rows), [len(v) for v in row_spaces])
    keys = np.sort(np.concatenate(row_spaces) * n_rows + rows)
    bounds = np.searchsorted(keys, np.arange(n_space + 1) * n_rows).tolist()
    ordered = (keys % n_rows).tolist()
    return [ordered[bounds[i]:bounds[i + 1]] for i in range(n_space)]


def _components(facts: ChannelFacts) -> tuple[int, np.ndarray, np.ndarray]:
    """ZIGs as connected components of the unions: their count, each element's ZIG, and each ZIG's first pin
    (an index into `facts.pins`, -1 where none)."""
    a, b = facts.union_pairs()
    shared_a, shared_b = _shared_slice_pairs(facts)
    a, b = np.concatenate([a, *shared_a]), np.concatenate([b, *shared_b])
    n = facts.n_elements
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    n_comp, labels = connected_components(graph, directed=False)
    labels = labels.astype(np.int64)
    pin_reason = np.full(n_comp, -1, dtype=np.int64)
    if facts.pins:
        pin_ids = np.concatenate([p.ids for p in facts.pins])
        pin_idx = np.concatenate([np.full(len(p.ids), i) for i, p in enumerate(facts.pins)])
        pin_reason[labels[pin_ids[::-1]]] = pin_idx[::-1]  # last write wins -> first pin's reason
    return n_comp, labels, pin_reason


def _number_spaces(sig: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """ZIGs with one signature form one space, numbered in order of their first ZIG (topological order of the
    graph): each ZIG's space, its position in the space, and each space's ZIGs."""
    _, first, space_of_comp = np.unique(sig, return_index=True, return_inverse=True)
    space_of_comp = space_of_comp.ravel()
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    comp_space = rank[space_of_comp]
    order = np.argsort(comp_space, kind="stable")
    bounds = np.searchsorted(comp_space[order], np.arange(len(first) + 1))
    comp_pos = np.empty(len(sig), dtype=np.int64)
    comp_pos[order] = np.arange(len(sig)) - bounds[comp_space[order]]
    return comp_space, comp_pos, [order[bounds[i]:bounds[i + 1]] for i in range(len(first))]


def _roles(facts: ChannelFacts, spaces_of_slice: list[np.ndarray], n_space: int) -> tuple[list[list[str]], list[list[str]]]:
    """Per space, the modules whose "out" slices hold it (producers) and those reading it otherwise; a parameter
    of the model itself (a `(1, C, 1, 1)` scale), whose module path is "", by its own name."""
    producers: list[list[str]] = []
    consumers: list[list[str]] = []
    owner = [s.module or s.name for s in facts.slices]
    for rows in _rows_per_space(spaces_of_slice, n_space):
        producers.append(list(dict.fromkeys(owner[r] for r in rows if facts.slices[r].role == "out")))
        consumers.append(list(dict.fromkeys(owner[r] for r in rows if facts.slices[r].role != "out")))
    return producers, consumers


def infer_zigs(facts: ChannelFacts) -> ZIGSet:
    """Group elements into ZIGs and ZIGs into channel spaces."""
    n_comp, labels, pin_reason = _components(facts)
    distinct = _Distinct(labels, n_comp)
    node_names: list[str] = []
    node_comps: list[np.ndarray] = []
    for name, lay in facts.layouts.items():
        lays = layouts_in(lay)
        if lays:
            node_names.append(name)
            node_comps.append(distinct.of_all([x.ids for x in lays]))
    pairs_node = np.repeat(np.arange(len(node_comps)), [len(c) for c in node_comps])
    sig = _signature_hash(np.concatenate(node_comps), pairs_node, n_comp, len(node_names))
    pinned = pin_reason >= 0
    sig ^= pinned.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    comp_space, comp_pos, members = _number_spaces(sig)
    n_space = len(members)
    space_reason = np.full(n_space, len(facts.pins), dtype=np.int64)  # first pin of any of its ZIGs; none: len
    np.minimum.at(space_reason, comp_space[pinned], pin_reason[pinned])

    space_of = _Distinct(comp_space, n_space)  # spaces of an array of ZIG ids
    node_spaces = [space_of(comps) for comps in node_comps]
    nodes_of_space = [[node_names[r] for r in rows] for rows in _rows_per_space(node_spaces, n_space)]
    producers, consumers = _roles(facts, [space_of(distinct(x.ids)) for x in facts.slices], n_space)
    spaces = []
    for i, (comps, reason_idx) in enumerate(zip(members, space_reason.tolist(), strict=True)):
        is_pinned = reason_idx < len(facts.pins)
        spaces.append(ChannelSpace(
            index=i,
            name=producers[i][0] if producers[i] else nodes_of_space[i][0],
            width=len(comps),
            pinned=is_pinned,
            reason=facts.pins[reason_idx].reason + f" (at {facts.pins[reason_idx].node})" if is_pinned else None,
            producers=producers[i],
            consumers=[c for c in consumers[i] if c not in producers[i]],
            nodes=nodes_of_space[i],
            components=comps,
        ))
    _dedupe_names(spaces)
    return ZIGSet(spaces, labels, comp_space, comp_pos, facts.slices, facts)


def _dedupe_names(spaces: list[ChannelSpace]) -> None:
    seen: dict[str, int] = defaultdict(int)
    for s in spaces:
        seen[s.name] += 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"
