"""`ato.visualize()`: an SVG when graphviz's `dot` exists, else a .dot file and a warning."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import atofx
from atofx import visualize
from tests.test_report import Net

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
