"""Invariant checks shared by the tests: each raises AssertionError with what went wrong."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from atofx.passes.channel_layout import ChannelLayout
from atofx.passes.equivalence import node_values

from atofx.ato.model import ATOModel


def _layouts(value) -> list[tuple[int, ChannelLayout]]:
    if isinstance(value, ChannelLayout):
        return [(-1, value)]
    if isinstance(value, (tuple, list)):
        return [(i, x) for i, x in enumerate(value) if isinstance(x, ChannelLayout)]
    return []


def assert_zero_invariant(ato: ATOModel, zigs_per_space: int = 2, seed: int = 0) -> int:
    """Invariant 1: zeroing a ZIG's parameters zeroes every position the analysis says is zero,
    and every consumer (conv/linear input) of an unpinned ZIG reads zeros. Returns ZIGs checked."""
    zigs = ato.zigs
    gm = ato.graph_module
    rng = np.random.default_rng(seed)
    params = dict(gm.named_parameters()) | dict(gm.named_buffers())
    gm.eval()
    checked = 0
    for space in zigs.prunable:
        picks = rng.choice(space.width, size=min(zigs_per_space, space.width), replace=False)
        for zig in picks:
            comp = space.components[zig]
            saved = []
            with torch.no_grad():
                for module, name, dim, idx in zigs.zig_slices(space.index, int(zig)):
                    p = params[f"{module}.{name}" if module else name]
                    saved.append((p, p.detach().clone()))
                    p.index_fill_(dim, torch.as_tensor(idx), 0.0)
            try:
                values = node_values(gm, ato.example_inputs)
            finally:
                with torch.no_grad():
                    for p, old in saved:
                        p.copy_(old)
            for name, lay in zigs.facts.layouts.items():
                for i, x in _layouts(lay):
                    pos = np.flatnonzero((zigs.labels[x.ids] == comp) & x.zero)
                    if not pos.size:
                        continue
                    value = values[name] if i < 0 else values[name][i]
                    got = value.index_select(x.dim, torch.as_tensor(pos))
                    assert torch.count_nonzero(got) == 0, (
                        f"space {space.name} ZIG {zig}: node {name} positions {pos.tolist()[:8]} "
                        f"claimed zero, max |v| = {got.abs().max().item():.3g}"
                    )
            for s in zigs.slices:  # consumers: layers whose weight sums over input channels
                if s.role == "in" and s.name == "weight" and (zigs.labels[s.ids] == comp).any():
                    node = next(n for n in gm.graph.nodes if n.name == s.node)
                    src = node.args[0]
                    lay = zigs.facts.layouts.get(src.name) if isinstance(src, fx.Node) else None
                    if isinstance(lay, ChannelLayout) and node.op in ("call_module", "call_function"):
                        hit = zigs.labels[lay.ids] == comp
                        assert lay.zero[hit].all() or not hit.any(), (
                            f"consumer {s.module} of space {space.name} reads a non-zero channel"
                        )
            checked += 1
    return checked
