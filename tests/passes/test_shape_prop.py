"""atofx's shape propagation records exactly what fx's ShapeProp records, with less work per node and, with
`shape_only`, without the arithmetic of convs, linear and batch-norm layers."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.fx as fx
from atofx.passes.shape_prop import NodeFailed, ShapeProp, tensor_meta
from atofx.passes.tracing import trace, trace_graph
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp as FxShapeProp
from torch.fx.passes.shape_prop import _extract_tensor_metadata

import atofx
from atofx.app import model_zoo

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
    assert tensor_meta(t) == _extract_tensor_metadata(t)


def _metas(graph: fx.Graph) -> list:
    return [(n.name, n.meta.get("tensor_meta"), n.meta["type"]) for n in graph.nodes]


@pytest.mark.parametrize("shape_only", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5", "googlenet", "mobilenet_v3_small"])
def test_node_meta_is_fx_s(name: str, channels_last: bool, shape_only: bool) -> None:
    """Same `tensor_meta` and `type` on every node, tuple-valued nodes (chunk) and channels-last inputs included;
    the same output values unless only shapes were asked for."""
    zoo = model_zoo.load(name, (3, 32, 32))
    model = zoo.model.eval()
    x = zoo.example.to(memory_format=torch.channels_last) if channels_last else zoo.example
    graph, gm = trace_graph(model), trace(model)
    with torch.no_grad():
        ours = ShapeProp(model, graph, shape_only=shape_only).propagate(x)
        theirs = FxShapeProp(gm).propagate(x)
    assert _metas(graph) == _metas(gm.graph)
    assert torch.equal(ours, theirs) != shape_only  # shape_only: zeros went through the convs


@given(
    dims=st.integers(1, 3),
    channels=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.one_of(st.integers(0, 3), st.sampled_from(["same", "valid"])),
    size=st.integers(1, 9),
    batch=st.integers(1, 2),
)
def test_layer_shapes_are_computed_ones(dims, channels, groups, kernel, stride, dilation, padding, size, batch) -> None:
    """Conv, linear and batch-norm layers in shape-only mode give the metadata running them gives, or run."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    if padding == "same":
        stride = 1
    model = nn.Sequential(
        conv(2 * channels, 2 * channels, kernel, stride, padding, dilation, groups), bn(2 * channels), nn.Flatten(),
    ).eval()
    x = torch.randn(batch, 2 * channels, *[size] * dims)
    try:
        with torch.no_grad():
            flat = model(x)
    except RuntimeError:  # the kernel is larger than the padded input: shape-only mode must fail too
        with pytest.raises(NodeFailed):
            ShapeProp(model, trace_graph(model), shape_only=True).propagate(x)
        return
    model.append(nn.Linear(flat.shape[1], 3))
    graph, gm = trace_graph(model), trace(model)
    with torch.no_grad():
        ShapeProp(model, graph, shape_only=True).propagate(x)
        FxShapeProp(gm).propagate(x)
    assert _metas(graph) == _metas(gm.graph)


class _SamplesFromConv(nn.Module):
    """Its output's shape hangs on the conv's values: all zeros make multinomial fail."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.conv(x).flatten(1).relu()
        return x[:, :, 0, 0] + torch.multinomial(probs, 1).float()


def test_compile_reruns_with_values_when_zeros_fail() -> None:
    model = _SamplesFromConv()
    graph = trace_graph(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(NodeFailed) as failed:
        ShapeProp(model, graph, shape_only=True).propagate(x)
    # an atofx error in its own right, naming the node, for a direct user of ShapeProp
    assert isinstance(failed.value, atofx.AtofxError) and failed.value.node.target is torch.multinomial
    assert "multinomial" in str(failed.value) and "RuntimeError" in str(failed.value)
    ato = atofx.compile(model, (x,))
    assert ato.example_output.shape == (2, 3)
