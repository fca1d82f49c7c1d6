"""Equivalence of a masked model and its pruned version, and where they first part ways."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .channel_layout import ChannelLayout
from .values import device_of, evaluating, tensors_in
from .zig_inference import ZIGSet


def relative_difference(a: Any, b: Any) -> float:
    """max |a - b| / max |a| over all tensors of two (nested) outputs; inf if structures differ."""
    ta, tb = tensors_in(a), tensors_in(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return float("inf")
    diff = max((float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb, strict=True) if x.numel()),
               default=0.0)
    scale = max((float(x.double().abs().max()) for x in ta if x.numel()), default=0.0)
    return diff / max(scale, 1e-12)


def run_eval(model: nn.Module, inputs: tuple) -> Any:
    """Eval-mode, no-grad forward on the model's own device (`device_of`)."""
    device = device_of(model)
    if device is not None:
        inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    with evaluating(model):
        return model(*inputs)


class _Record(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def node_values(gm: fx.GraphModule, inputs: tuple) -> dict[str, Any]:
    """Every node's value in one eval-mode run; nodes after a failure are missing."""
    rec = _Record(gm)
    rec.values = {}
    with evaluating(gm), suppress(Exception):  # the pruned graph may break part-way: what ran
        rec.run(*inputs)  # is what we compare
    return rec.values


def first_divergence(reference: fx.GraphModule, pruned: fx.GraphModule, inputs: tuple, zigs: ZIGSet,
                     keep_comp: np.ndarray, tol: float) -> str:
    """Name of the first node whose pruned value differs from the masked value at the kept channels."""
    ref, new = node_values(reference, inputs), node_values(pruned, inputs)
    for node in reference.graph.nodes:
        lay = zigs.facts.layouts.get(node.name)
        if node.name not in ref or not isinstance(lay, ChannelLayout) or not isinstance(ref[node.name], torch.Tensor):
            continue
        if node.name not in new:
            return f"{node.name} ({node.op} {node.target}): the pruned model failed here"
        kept = torch.as_tensor(np.flatnonzero(keep_comp[zigs.labels[lay.ids]]))
        expect = ref[node.name].index_select(lay.dim, kept)
        if relative_difference(expect, new[node.name]) > tol:
            return f"{node.name} ({node.op} {node.target})"
    return "the outputs (no single layer differs)"
