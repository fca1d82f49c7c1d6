"""The passes run by hand, without the ATOModel façade: trace, shapes, dependency facts, ZIGs."""

from __future__ import annotations

import torch
import torch.fx as fx
from atofx.passes.dependency import ChannelDependencyPass
from atofx.passes.registry import OpTable
from atofx.passes.shape_prop import ShapeProp
from atofx.passes.tracing import trace
from atofx.passes.zig_inference import ChannelSpace, ZIGSet, infer_zigs
from torch import nn


def analyse(model: nn.Module, x: torch.Tensor, ops: OpTable | None = None) -> tuple[fx.GraphModule, ZIGSet]:
    """`model` (in eval mode) traced, its shapes propagated on `x`, its ZIGs inferred with the op table `ops`."""
    gm = trace(model.eval())
    with torch.no_grad():
        ShapeProp(gm, gm.graph).propagate(x)
    return gm, infer_zigs(ChannelDependencyPass(gm, ops=ops).run())


def space_of(zigs: ZIGSet, producer: str) -> ChannelSpace:
    """The one channel space `producer`'s output channels belong to."""
    found = [s for s in zigs.spaces if producer in s.producers]
    assert len(found) == 1, [str(s) for s in found]
    return found[0]


def rows(zigs: ZIGSet, space: ChannelSpace, module: str, dim: int) -> list[list[int]]:
    """Per ZIG of `space`, the indices of `module.weight` along `dim` that belong to it."""
    found = []
    for z in range(space.width):
        idx = [i for m, n, d, ids in zigs.zig_slices(space.index, z, ("out", "in")) if (m, n, d) == (module, "weight", dim)
               for i in ids.tolist()]
        found.append(sorted(idx))
    return found


class Flip(nn.Module):
    """A conv, a flip over channels (an op outside the rule table), a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flip(self.a(x), dims=[1]))
