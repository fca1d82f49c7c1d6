"""`ato.visualize()`: an SVG when graphviz's `dot` exists, else a .dot file and a warning."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import atofx
from atofx.core import visualize
from tests.core.test_report import Net

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot program is not installed")


@pytest.fixture(scope="module")
def ato() -> atofx.ATOModel:
    torch.manual_seed(0)
    return atofx.compile(Net(), torch.randn(2, 3, 8, 8))


@needs_dot
def test_writes_svg_when_dot_exists(ato, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ato.visualize(tmp_path / "net.svg")
    assert out == tmp_path / "net.svg"
    text = out.read_text()
    assert "<svg" in text and "c1" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.svg"], "no intermediate .gv file left behind"


def test_writes_dot_and_warns_without_dot(ato, tmp_path, monkeypatch):
    monkeypatch.setattr(visualize.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="'dot' program is not installed"):
        out = ato.visualize(tmp_path / "net.svg")
    assert out == tmp_path / "net.dot"
    assert out.read_text().startswith("digraph")
    assert not (tmp_path / "net.svg").exists()


def test_dot_suffix_writes_source_without_warning(ato, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ato.visualize(tmp_path / "net.dot")
    assert out.read_text().startswith("digraph")


def test_graph_colours_spaces_and_marks_unknown_ops(ato):
    source = visualize.build_graph(ato).source
    for space in ato.zigs.prunable:
        assert f"space {space.index}" in source
    assert visualize._PINNED in source, "pinned spaces are grey"
    assert "UNKNOWN: function torch.flip" in source and "octagon" in source


class Blocks(torch.nn.Module):
    """Nested modules, so fx names (`blocks_0_conv`) and module paths (`blocks.0.conv`) differ."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Conv2d(8, 12, 1), torch.nn.ReLU(),
                                                                torch.nn.Conv2d(12, 8, 1)) for _ in range(9)])
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def blocks() -> atofx.ATOModel:
    torch.manual_seed(0)
    return atofx.compile(Blocks(), torch.randn(1, 3, 6, 6))


def test_the_picture_has_a_title_a_legend_module_paths_and_pinned_reasons(blocks):
    source = visualize.build_graph(blocks, "layers").source
    assert "Blocks: 12 channel spaces, 10 prunable" in source and "cluster_legend" in source
    assert "blocks.0.0" in source and "blocks_0_0\\n" not in source
    pinned = next(s for s in blocks.spaces if s.pinned)
    assert f"pinned: {pinned.reason}" in source


def test_every_space_has_its_own_colour(blocks):
    colours = [visualize.space_colour(s.index) for s in blocks.spaces]
    assert len(set(colours)) == len(colours) == 12
    assert len({visualize.space_colour(i) for i in range(500)}) == 500


def test_the_space_view_has_one_box_per_space_joined_through_layers(blocks):
    source = visualize.build_graph(blocks, "spaces").source
    boxes = [line for line in source.splitlines() if line.strip().startswith("space") and "->" not in line]
    assert len(boxes) == len(blocks.spaces)
    assert 'label="blocks.0.0"' in source, "the edge from the stream into a hidden space is labelled by its conv"


def test_large_graphs_get_the_space_view_by_default(blocks, monkeypatch):
    assert visualize.pick_view(blocks) == "layers"
    monkeypatch.setattr(visualize, "LARGE_GRAPH", 10)
    assert visualize.pick_view(blocks) == "spaces"
    with pytest.raises(atofx.ConfigError, match="view must be one of"):
        visualize.pick_view(blocks, "graph")


def test_dot_past_its_time_cap_leaves_the_source_and_a_warning(blocks, tmp_path, monkeypatch):
    import subprocess

    def too_slow(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(visualize.shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(visualize.subprocess, "run", too_slow)
    with pytest.warns(atofx.AtofxWarning, match=r"took more than 5 s"):
        out = blocks.visualize(tmp_path / "b.svg", timeout=5)
    assert out == tmp_path / "b.dot" and sorted(p.name for p in tmp_path.iterdir()) == ["b.dot"]
