"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atofx.model import ATOModel


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _names(items: list[str], limit: int = 3) -> str:
    if not items:
        return "-"
    shown = ", ".join(items[:limit])
    return shown + (f" +{len(items) - limit}" if len(items) > limit else "")


def spaces_table(ato: ATOModel) -> str:
    zigs = ato.zigs
    share = ato.flops_model.space_share()
    rows = []
    for s in zigs.spaces:
        status = "prunable" if not s.pinned else f"pinned: {s.reason}"
        rows.append([s.index, s.name, s.width, _names(s.producers), _names(s.consumers),
                     f"{100 * share.get(s.index, 0.0):.1f}%", status])
    n_prunable = len(zigs.prunable)
    prunable_width = sum(s.width for s in zigs.prunable)
    unknown = sorted(set(zigs.facts.unknown_ops.values()))
    summary = (
        f"{len(zigs.spaces)} channel spaces, {n_prunable} prunable ({prunable_width} ZIGs); "
        f"{ato.flops_model.total / 1e6:.1f} MFLOPs"
    )
    if unknown:
        summary += "\nops outside the rule table (their channels are pinned): " + "; ".join(unknown)
    table = format_table(["#", "space", "width", "producers", "consumers", "FLOPs", "status"], rows)
    return f"{table}\n{summary}"
