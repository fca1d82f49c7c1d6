"""Graphviz picture of the traced graph, one colour per channel space."""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import graphviz

from atofx.passes.channel_layout import layouts_in

if TYPE_CHECKING:
    from atofx.model import ATOModel

_PALETTE = [
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
    "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#e5c494",
]
_PINNED = "#d9d9d9"


def build_graph(ato: ATOModel) -> graphviz.Digraph:
    zigs = ato.zigs
    facts = zigs.facts
    dot = graphviz.Digraph(type(ato.model).__name__, graph_attr={"rankdir": "TB", "fontsize": "10"},
                           node_attr={"shape": "box", "style": "filled,rounded", "fontsize": "9"})
    for name, lay in facts.layouts.items():
        lays = layouts_in(lay)
        if not lays:
            continue
        spaces = Counter(int(s) for x in lays for s in zigs.comp_space[zigs.labels[x.ids]])
        main = spaces.most_common(1)[0][0]
        space = zigs.spaces[main]
        colour = _PINNED if space.pinned else _PALETTE[main % len(_PALETTE)]
        label = f"{name}\n{sum(x.width for x in lays)} ch, space {main}"
        if len(spaces) > 1:
            label += f" (+{len(spaces) - 1})"
        attrs = {"fillcolor": colour}
        if name in facts.unknown_ops:
            attrs.update(shape="octagon", color="red", penwidth="2")
            label += f"\nUNKNOWN: {facts.unknown_ops[name]}"
        elif space.pinned:
            attrs.update(color="gray40", style="filled,rounded,dashed")
        dot.node(name, label, **attrs)
    for (src, _), (dst, _) in facts.graph.edges:
        dot.edge(src, dst)
    return dot


def draw_spaces(ato: ATOModel, path: Path) -> Path:
    dot = build_graph(ato)
    fmt = path.suffix.lstrip(".") or "svg"
    if fmt == "dot" or shutil.which("dot") is None:
        out = path.with_suffix(".dot")
        out.write_text(dot.source)
        if fmt != "dot":
            warnings.warn(
                f"graphviz's 'dot' program is not installed, so wrote {out} instead of {path}; "
                "install it (apt-get install graphviz) to render pictures.",
                stacklevel=3,
            )
        return out
    rendered = dot.render(outfile=str(path), format=fmt, cleanup=True)
    path.with_suffix(".gv").unlink(missing_ok=True)
    return Path(rendered)
