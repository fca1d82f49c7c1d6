"""The instrument pass: mask nodes in front of every layer that reads channels.

Each consumer (a conv, linear or transposed conv that sums over its input channels) gets a
`ChannelMask` on its input. A mask node is the identity until `MaskSlots.set` gives it a
keep vector; then it multiplies each channel by its ZIG's bit, which is exactly what removing
the dropped channels does to that consumer. The controller trains through these nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from .channel_layout import ChannelLayout
from .zig_inference import ZIGSet


class ChannelMask(nn.Module):
    """Scales one channel dim by a per-position vector; the identity while `scale` is None."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.scale: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is None:
            return x
        shape = [1] * x.ndim
        shape[self.dim] = -1
        return x * self.scale.to(x.dtype).view(shape)


@dataclass
class MaskSlots:
    """The mask nodes of one instrumented GraphModule and the ZIG id of each of their positions."""

    masks: list[ChannelMask]
    positions: list[Tensor]  # ZIG id per channel position, one per mask node

    def set(self, keep: Tensor | None) -> None:
        """Activate every mask node with one keep value per ZIG id (None: identity again)."""
        for m, pos in zip(self.masks, self.positions, strict=True):
            m.scale = None if keep is None else keep[pos.to(keep.device)]


def _consumers(zigs: ZIGSet) -> dict[str, None]:
    """Nodes that sum over their first argument's channels: a weight reads them ("in" slices of a weight, an
    RNN's input weights) or a matrix product contracts them."""
    found = {s.node: None for s in zigs.slices if s.role == "in" and s.name.startswith("weight")}
    return found | dict.fromkeys(zigs.facts.contractions)


def instrument(gm: fx.GraphModule, zigs: ZIGSet) -> MaskSlots:
    """Insert a mask node before each consumer of a prunable channel; returns the slots."""
    consumers = _consumers(zigs)
    masks, positions = [], []
    for node in list(gm.graph.nodes):
        if node.name not in consumers or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        lay = zigs.facts.layouts.get(src.name)
        if not isinstance(lay, ChannelLayout):
            continue
        comps = zigs.labels[lay.ids]
        if all(zigs.spaces[s].pinned for s in np.unique(zigs.comp_space[comps])):
            continue
        name = f"atofx_mask_{len(masks)}"
        mask = ChannelMask(lay.dim)
        gm.add_submodule(name, mask)
        with gm.graph.inserting_before(node):
            masked = gm.graph.call_module(name, (src,))
        node.replace_input_with(src, masked)
        masks.append(mask)
        positions.append(torch.as_tensor(comps))
    gm.recompile()
    return MaskSlots(masks, positions)
