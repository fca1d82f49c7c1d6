"""Pictures of the benchmark results, drawn from the JSON each bench tool writes (matplotlib, Agg canvas).

Each bench tool draws its own with `--plot PATH`; this script redraws one from a saved JSON file without
running the benchmark again (the kind is read from the file's keys):

    python tools/bench_plots.py bench-accuracy.json accuracy.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

OVERHEAD_TARGETS = {"outside": 1.05, "inside": 1.10}
LATENCY_GOAL = 0.8  # latency speedup / FLOPs speedup


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _caption(payload: dict) -> str:
    machine = payload.get("machine", {})
    if machine is None:  # a --report of runs from several kinds of machine: their JSONs name each
        return f"{payload.get('date', '')}, runs from more than one kind of machine (see the sources' JSON)"
    return f"{payload.get('date', '')}, torch {machine.get('torch', '?')}, {machine.get('cpu_count', '?')} CPU cores"


def plot_accuracy(payload: dict, out: Path) -> Path:
    """Accuracy (mean, std over seeds) against the FLOPs share kept, one series per method; dense as a line."""
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    rows = payload["rows"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["flops_kept_mean"])
        if method == "dense":
            ax.axhline(mine[0]["acc_mean"], color="grey", linestyle="--", label=f"dense ({mine[0]['acc_mean']:.2f}%)")
            continue
        ax.errorbar([r["flops_kept_mean"] for r in mine], [r["acc_mean"] for r in mine],
                    yerr=[r["acc_std"] for r in mine], marker="o", capsize=3, label=method)
    ax.set_xlabel("share of dense FLOPs kept")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(f"{payload.get('model', '')} on {payload.get('dataset', '')}: accuracy at equal FLOPs", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(_caption(payload), fontsize=7, color="grey")
    fig.savefig(out)
    return out


def _latency_series(row: dict) -> tuple[str, str, int]:
    """One line per model, memory format and channel rounding (older runs lack the last two)."""
    return row["model"], row.get("memory_format", "contiguous"), row.get("round_to", 1)


def plot_latency(payload: dict, out: Path) -> Path:
    """Latency speedup against FLOPs speedup, one panel per batch size, one line per `_latency_series`: a colour per
    model, a line style per memory format, a marker (and shade) per rounding."""
    rows = payload["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig = _figure(5.0 * len(batches), 4.2)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    top = max(r["flops_speedup"] for r in rows) * 1.05
    for ax, batch in zip(axes, batches, strict=True):
        ax.plot([1, top], [1, top], color="grey", linewidth=0.8, label="latency = FLOPs speedup")
        ax.plot([1, top], [LATENCY_GOAL, LATENCY_GOAL * top], color="grey", linestyle=":", linewidth=0.8,
                label=f"{LATENCY_GOAL} x FLOPs speedup")
        series = dict.fromkeys(_latency_series(r) for r in rows if r["batch"] == batch)
        colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for m, _, _ in series))}  # one per model
        for model, layout, round_to in series:
            mine = sorted((r for r in rows if r["batch"] == batch and _latency_series(r) == (model, layout, round_to)),
                          key=lambda r: r["flops_speedup"])
            rounded = f", round to {round_to}" if round_to > 1 else ""
            ax.plot([1.0] + [r["flops_speedup"] for r in mine], [1.0] + [r["latency_speedup"] for r in mine],
                    marker="o" if round_to == 1 else "s", linestyle="-" if layout == "contiguous" else "--",
                    color=colours[model], alpha=1.0 if round_to == 1 else 0.6, label=f"{model}, {layout}{rounded}")
        ax.set_xlabel("FLOPs speedup (dense / pruned)")
        ax.set_ylabel("latency speedup (dense / pruned)")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(_caption(payload), fontsize=7, color="grey")
    fig.savefig(out)
    return out


def plot_analysis(payload: dict, out: Path) -> Path:
    """atofx compile time / torch-pruning build_dependency time per model, sorted, with the 1.0 line."""
    rows = sorted((r for r in payload["rows"] if r.get("ratio") is not None), key=lambda r: r["ratio"])
    fig = _figure(6.5, max(2.5, 0.18 * len(rows) + 1.2))
    ax = fig.add_subplot()
    ax.barh([r["model"] for r in rows], [r["ratio"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlim(0, max(1.1, 1.05 * rows[-1]["ratio"]))
    ax.set_xlabel("atofx compile / torch-pruning build_dependency, time\n(below 1: atofx is faster)")
    ax.set_title(f"analysis time, median ratio {payload['median_ratio']:.2f} over {len(rows)} models", fontsize=10)
    fig.suptitle(_caption(payload), fontsize=7, color="grey")
    fig.savefig(out)
    return out


def plot_overhead(payload: dict, out: Path) -> Path:
    """ATO epoch time / plain epoch time outside and inside the controller window, per model, with the targets."""
    models = payload["models"]
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    width = 0.38
    for i, (kind, colour) in enumerate((("outside", "tab:blue"), ("inside", "tab:orange"))):
        xs = [j + (i - 0.5) * width for j in range(len(models))]
        ax.bar(xs, [m[f"ratio_{kind}_window"] for m in models.values()], width, color=colour,
               label=f"{kind} the window")
        ax.axhline(OVERHEAD_TARGETS[kind], color=colour, linestyle="--", linewidth=0.8,
                   label=f"target {OVERHEAD_TARGETS[kind]:.2f}")
    ax.set_xticks(range(len(models)), list(models), fontsize=8)
    ax.set_ylim(0.9, max(1.2, *(m["ratio_inside_window"] + 0.02 for m in models.values())))
    ax.set_ylabel("ATO epoch time / plain epoch time")
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(out)
    return out


def plot_for(payload: dict) -> Callable[[dict, Path], Path]:
    """The drawing function for a bench tool's JSON payload, told apart by its keys."""
    if "median_ratio" in payload:
        return plot_analysis
    if "models" in payload and "ratio_outside_window" in payload:
        return plot_overhead
    rows = payload.get("rows") or [{}]
    if "latency_speedup" in rows[0]:
        return plot_latency
    if "acc_mean" in rows[0]:
        return plot_accuracy
    raise ValueError("not a JSON file written by tools/bench_{accuracy,analysis,latency,overhead}.py --json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a file written by a bench tool's --json")
    parser.add_argument("png", type=Path, help="the picture to write")
    args = parser.parse_args(argv)
    try:
        payload = json.loads(args.json.read_text())
        draw = plot_for(payload)
    except (OSError, ValueError) as exc:
        print(f"error: {args.json}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {draw(payload, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
