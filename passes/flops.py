"""FLOPs per node, and the differentiable FLOPs model P(keep) built from the ZIGs.

Per-node FLOPs are what `torch.utils.flop_counter.FlopCounterMode` counts, so the model
agrees with the counter by construction; each counted node scales with the fraction of
channels kept at its input and/or output, as its op rule declared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from .channel_layout import ChannelLayout, layouts_in
from .zig_inference import ZIGSet


class FlopsProp(fx.Interpreter):
    """Runs the graph once and stores each node's counted FLOPs in `node.meta["flops"]`."""

    def run_node(self, n: fx.Node) -> Any:
        before = self._counter.get_total_flops()
        result = super().run_node(n)
        n.meta["flops"] = self._counter.get_total_flops() - before
        return result

    def propagate(self, *args: Any) -> Any:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self._counter = counter
            return self.run(*args)


def _first_layout(value: Any) -> ChannelLayout | None:
    return next(iter(layouts_in(value)), None)


class FlopsModel:
    """P(keep): FLOPs of the model with the given channels kept; differentiable in `keep`."""

    def __init__(self, gm: fx.GraphModule, zigs: ZIGSet):
        self.zigs = zigs
        layouts = zigs.facts.layouts
        rows: list[np.ndarray] = []
        terms: list[tuple[float, int, int]] = []  # (flops, input row or -1, output row or -1)
        self.constant = 0.0
        self.node_flops: dict[str, float] = {}
        row_of: dict[str, int] = {}

        def row(name: str | None) -> int:
            lay = _first_layout(layouts.get(name)) if name else None
            if lay is None:
                return -1
            if name not in row_of:
                row_of[name] = len(rows)
                rows.append(zigs.labels[lay.ids])
            return row_of[name]

        for node in gm.graph.nodes:
            flops = float(node.meta.get("flops", 0))
            if flops == 0:
                continue
            self.node_flops[node.name] = flops
            how = zigs.facts.flops.get(node.name)
            if how is None or how.scaling == "const":
                self.constant += flops
                continue
            r_in = row(how.input) if how.scaling == "in*out" else -1
            self.constant += flops * (1.0 - how.share)
            terms.append((flops * how.share, r_in, row(node.name)))
        self.total = self.constant + sum(t[0] for t in terms)
        self._n_rows = len(rows)
        self._rows = torch.as_tensor(np.concatenate([np.full(len(x), i) for i, x in enumerate(rows)] or [[]]),
                                     dtype=torch.long)
        self._cols = torch.as_tensor(np.concatenate(rows or [[]]), dtype=torch.long)
        self._weights = torch.as_tensor(np.concatenate([np.full(len(x), 1.0 / len(x)) for x in rows] or [[]]))
        t = np.asarray(terms, dtype=np.float64).reshape(-1, 3)
        self._flops = torch.as_tensor(t[:, 0])
        self._in = torch.as_tensor(t[:, 1].astype(np.int64))
        self._out = torch.as_tensor(t[:, 2].astype(np.int64))
        self._components: dict[tuple, torch.Tensor] = {}

    def keep_vector(self, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        """One float per ZIG id: the given bits for listed spaces, 1 elsewhere."""
        dtype = next(iter(keep.values())).dtype if keep else torch.float64
        device = next(iter(keep.values())).device if keep else None
        vec = torch.ones(len(self.zigs.comp_space), dtype=dtype, device=device)
        if not keep:
            return vec
        key = (tuple(keep), vec.device)
        comps = self._components.get(key)
        if comps is None:  # the ZIG ids of the listed spaces, in their order; the same few keys every step
            ids = np.concatenate([np.asarray(self.zigs.spaces[i].components, dtype=np.int64) for i in keep])
            comps = self._components[key] = torch.as_tensor(ids, device=vec.device)
        return vec.index_put((comps,), torch.cat([bits.to(dtype) for bits in keep.values()]))

    def __call__(self, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.of_vector(self.keep_vector(keep))

    def of_vector(self, vec: torch.Tensor) -> torch.Tensor:
        """P for a keep vector (one value per ZIG id, as `keep_vector` builds it)."""
        dev = vec.device
        frac = vec.new_zeros(self._n_rows + 1).index_add(
            0, self._rows.to(dev), vec[self._cols.to(dev)] * self._weights.to(dev, vec.dtype))
        frac[-1] = 1.0  # row -1: no tracked channels, fraction 1
        f_in = frac[self._in.to(vec.device)]
        f_out = frac[self._out.to(vec.device)]
        return self.constant + (self._flops.to(vec.device, vec.dtype) * f_in * f_out).sum()

    def space_share(self) -> dict[int, float]:
        """Share of total FLOPs in ops that read or write each space."""
        share: dict[int, float] = {}
        layouts = self.zigs.facts.layouts
        for name, flops in self.node_flops.items():
            how = self.zigs.facts.flops.get(name)
            touched: set[int] = set()
            for src in (name, how.input if how else None):
                lay = _first_layout(layouts.get(src)) if src else None
                if lay is not None:
                    touched.update(np.unique(self.zigs.comp_space[self.zigs.labels[lay.ids]]).tolist())
            for s in touched:
                share[s] = share.get(s, 0.0) + flops / self.total
        return share
