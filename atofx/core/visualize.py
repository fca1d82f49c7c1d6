"""Graphviz picture of the traced graph, one colour per channel space.

Two views: `layers` (one box per graph node, coloured by its channel space) and `spaces` (one box per channel
space, an edge wherever a layer reads one space and writes another, labelled with that layer). `dot` needs
minutes for the layer view of a model with a thousand nodes (densenet121), so large models get the space view
by default and `dot` runs under a time cap; past it, the `.dot` source is written instead, with a warning.
"""

from __future__ import annotations

import colorsys
import shutil
import subprocess
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import graphviz

from atofx.errors import AtofxWarning, ConfigError
from atofx.passes.channel_layout import layouts_in

if TYPE_CHECKING:
    from atofx.core.analysis import Analysis

_PINNED = "#d9d9d9"
VIEWS = ("auto", "layers", "spaces")
LARGE_GRAPH = 250  # graph nodes with channels above which "auto" draws the space view
DOT_SECONDS = 60.0  # time cap on graphviz's `dot`


def space_colour(index: int) -> str:
    """A fill colour per space index, never repeated: hues a golden angle apart, two lightness bands."""
    hue = (index * 0.6180339887) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.35 if index % 2 else 0.55, 0.97)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def _display_names(ato: Analysis) -> dict[str, str]:
    """fx node name -> what the report prints: the module path (`layer1.0.conv1`) for layers, else the node name."""
    return {n.name: str(n.target) if n.op == "call_module" else n.name for n in ato.graph.nodes}


def _node_spaces(ato: Analysis) -> dict[str, tuple[int, int, int]]:
    """fx node name -> (its main space, how many spaces its channels belong to, channel count)."""
    zigs = ato.zigs
    out = {}
    for name, lay in zigs.facts.layouts.items():
        lays = layouts_in(lay)
        if lays:
            spaces = Counter(int(s) for x in lays for s in zigs.comp_space[zigs.labels[x.ids]])
            out[name] = (spaces.most_common(1)[0][0], len(spaces), sum(x.width for x in lays))
    return out


def _pinned_note(reason: str | None) -> str:
    return f"\npinned: {reason}" if reason else "\npinned"


def _digraph(ato: Analysis, view: str) -> graphviz.Digraph:
    zigs = ato.zigs
    title = (f"{type(ato.model).__name__}: {len(zigs.spaces)} channel spaces, {len(zigs.prunable)} prunable "
             f"({view} view: {'one box per layer' if view == 'layers' else 'one box per channel space'})")
    dot = graphviz.Digraph(type(ato.model).__name__,
                           graph_attr={"rankdir": "TB", "fontsize": "12", "label": title, "labelloc": "t"},
                           node_attr={"shape": "box", "style": "filled,rounded", "fontsize": "9"})
    with dot.subgraph(name="cluster_legend", graph_attr={"label": "legend", "fontsize": "10", "style": "dashed"}) as g:
        g.node("legend_prunable", "prunable: one colour per space", fillcolor=space_colour(0))
        g.node("legend_pinned", "pinned (never pruned): reason below the name", fillcolor=_PINNED,
               color="gray40", style="filled,rounded,dashed")
        if zigs.facts.unknown_ops:
            g.node("legend_unknown", "op outside the rule table", shape="octagon", color="red", penwidth="2",
                   fillcolor="white")
    return dot


def _layer_view(ato: Analysis) -> graphviz.Digraph:
    zigs, facts = ato.zigs, ato.zigs.facts
    dot = _digraph(ato, "layers")
    names = _display_names(ato)
    for name, (main, n_spaces, width) in _node_spaces(ato).items():
        space = zigs.spaces[main]
        label = f"{names.get(name, name)}\n{width} ch, space {main}"
        if n_spaces > 1:
            label += f" (+{n_spaces - 1})"
        attrs = {"fillcolor": _PINNED if space.pinned else space_colour(main)}
        if name in facts.unknown_ops:
            attrs.update(shape="octagon", color="red", penwidth="2")
            label += f"\nUNKNOWN: {facts.unknown_ops[name]}"
        elif space.pinned:
            attrs.update(color="gray40", style="filled,rounded,dashed")
            label += _pinned_note(space.reason)
        dot.node(name, label, **attrs)
    for (src, _), (dst, _) in facts.graph.edges:
        dot.edge(src, dst)
    return dot


def _space_view(ato: Analysis) -> graphviz.Digraph:
    zigs = ato.zigs
    dot = _digraph(ato, "spaces")
    names = _display_names(ato)
    of = _node_spaces(ato)
    for s in zigs.spaces:
        label = f"space {s.index}: {s.name}\n{s.width} ch"
        attrs = {"fillcolor": space_colour(s.index)}
        if s.pinned:
            attrs.update(fillcolor=_PINNED, color="gray40", style="filled,rounded,dashed")
            label += _pinned_note(s.reason)
        dot.node(f"space{s.index}", label, **attrs)
    through: dict[tuple[int, int], list[str]] = {}
    for (src, _), (dst, _) in zigs.facts.graph.edges:
        a, b = of[src][0], of[dst][0]
        if a != b:
            through.setdefault((a, b), []).append(names.get(dst, dst))
    for (a, b), layers in through.items():
        label = layers[0] + (f" +{len(layers) - 1}" if len(layers) > 1 else "")
        dot.edge(f"space{a}", f"space{b}", label=label, fontsize="8")
    return dot


def pick_view(ato: Analysis, view: str = "auto") -> str:
    """'layers' or 'spaces': `auto` draws the space view above LARGE_GRAPH nodes with channels."""
    if view not in VIEWS:
        raise ConfigError(f"view must be one of {', '.join(VIEWS)}, got {view!r}.")
    if view != "auto":
        return view
    return "spaces" if len(_node_spaces(ato)) > LARGE_GRAPH else "layers"


def build_graph(ato: Analysis, view: str = "layers") -> graphviz.Digraph:
    """The picture as a graphviz Digraph, in the `layers` or `spaces` view (`auto`: by the graph's size)."""
    return _space_view(ato) if pick_view(ato, view) == "spaces" else _layer_view(ato)


def _write_source(dot: graphviz.Digraph, path: Path, why: str | None) -> Path:
    out = path.with_suffix(".dot")
    out.write_text(dot.source)
    if why is not None:
        warnings.warn(f"{why}, so wrote {out} instead of {path}.", AtofxWarning, stacklevel=4)
    return out


def draw_spaces(ato: Analysis, path: Path, view: str = "auto", timeout: float = DOT_SECONDS) -> Path:
    """Write the picture to `path` (format from its suffix); the `.dot` source without `dot`, or past `timeout` s."""
    dot = build_graph(ato, view)
    fmt = path.suffix.lstrip(".") or "svg"
    if fmt == "dot":
        return _write_source(dot, path, None)
    program = shutil.which("dot")
    if program is None:
        return _write_source(dot, path, "graphviz's 'dot' program is not installed (apt-get install graphviz to "
                                        "render pictures)")
    try:
        subprocess.run([program, f"-T{fmt}", "-o", str(path)], input=dot.source, text=True, capture_output=True,
                       timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        path.unlink(missing_ok=True)
        return _write_source(dot, path, f"graphviz's 'dot' took more than {timeout:.0f} s to draw {path.name} "
                                        "(try the space view: view='spaces', `atofx inspect --view spaces`)")
    except subprocess.CalledProcessError as exc:
        return _write_source(dot, path, f"graphviz's 'dot' failed ({exc.stderr.strip()[:200]})")
    return path
