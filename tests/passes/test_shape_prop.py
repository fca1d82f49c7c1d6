"""atofx's shape propagation records exactly what fx's ShapeProp records, with less work per node."""

from __future__ import annotations

import itertools

import pytest
import torch
from atofx.passes.tracing import trace, trace_graph
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from atofx import model_zoo
from atofx.model import _QuietShapeProp, _tensor_meta

TENSORS = [
    torch.randn(2, 3, 4, 5),
    torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    torch.randn(1, 3, 4, 5).to(memory_format=torch.channels_last),
    torch.randn(2, 3, 1, 1).to(memory_format=torch.channels_last),
    torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d),
    torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)[:, :, :1],
    torch.randn(0, 3, 4, 5),
    torch.randn(1, 1, 1, 1),
    torch.tensor(1.0),
    torch.randn(3, 1).expand(3, 4),
    torch.randn(6, 8)[::2, ::3],
    torch.randn(2, 3, 4, 5, requires_grad=True),
    torch.randint(0, 4, (2, 3)),
    torch.randn(4, 4).to_sparse(),
    *(torch.randn(2, 3, 4, 5).permute(*order) for order in itertools.permutations(range(4))),
]


@pytest.mark.parametrize("t", TENSORS, ids=range(len(TENSORS)))
def test_tensor_metadata_is_fx_s(t: torch.Tensor) -> None:
    assert _tensor_meta(t) == _extract_tensor_metadata(t)


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5", "googlenet"])
def test_node_meta_is_fx_s(name: str) -> None:
    """Same `tensor_meta` and `type` on every node, tuple-valued nodes (chunk) and channels-last inputs included."""
    zoo = model_zoo.load(name, (3, 32, 32))
    model = zoo.model.eval()
    x = zoo.example.to(memory_format=torch.channels_last)
    graph, gm = trace_graph(model), trace(model)
    with torch.no_grad():
        ours = _QuietShapeProp(model, graph).propagate(x)
        theirs = ShapeProp(gm).propagate(x)
    assert torch.equal(ours, theirs)
    for a, b in zip(graph.nodes, gm.graph.nodes, strict=True):
        assert (a.name, a.meta.get("tensor_meta"), a.meta["type"]) == (b.name, b.meta.get("tensor_meta"), b.meta["type"])
