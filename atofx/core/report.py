"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atofx.core.analysis import Analysis


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns under a dashed rule, trailing spaces stripped."""
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


def space_records(ato: Analysis) -> list[dict[str, object]]:
    """One plain dict per channel space (what the table shows, untruncated): for JSON and for tests."""
    share = ato.flops_model.space_share()
    return [
        {"index": s.index, "name": s.name, "width": s.width, "producers": list(s.producers),
         "consumers": list(s.consumers), "flops_share": share.get(s.index, 0.0), "pinned": s.pinned,
         "reason": s.reason}
        for s in ato.zigs.spaces
    ]


def spaces_table(ato: Analysis) -> str:
    """The `ato.report()` table: one row per space, then a summary line (and the unknown ops, if any)."""
    zigs = ato.zigs
    rows = []
    for r in space_records(ato):
        status = f"pinned: {r['reason']}" if r["pinned"] else "prunable"
        rows.append([r["index"], r["name"], r["width"], _names(r["producers"]), _names(r["consumers"]),
                     f"{100 * r['flops_share']:.1f}%", status])
    n_prunable = len(zigs.prunable)
    prunable_width = sum(s.width for s in zigs.prunable)
    unknown = sorted(set(zigs.facts.unknown_ops.values()))
    summary = (
        f"{len(zigs.spaces)} channel spaces, {n_prunable} prunable ({prunable_width} ZIGs); "
        f"{ato.flops_model.total / 1e6:.1f} MFLOPs = {ato.flops_model.total / 2e6:.1f} M MACs (FLOPs = 2 x MACs; "
        "Torch-Pruning reports MACs)"
    )
    if unknown:
        summary += "\nops outside the rule table (their channels are pinned): " + "; ".join(unknown)
    table = format_table(["#", "space", "width", "producers", "consumers", "FLOPs", "status"], rows)
    return f"{table}\n{summary}"
