"""Pictures of a finished run, drawn with matplotlib's Agg canvas (no display needed).

- `accuracy_flops.png`: train and validation accuracy and the FLOPs kept by the mask, per epoch (log.jsonl);
- `widths.png`: every conv and linear layer's output width before and after pruning (widths.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atofx.errors import AtofxError

RUN_FILES = ("summary.json", "log.jsonl", "widths.json")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def read_log(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a log.jsonl file."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise AtofxError(f"{path} is not a log.jsonl written by atofx ({exc}).") from exc


def plot_accuracy_flops(records: list[dict[str, Any]], out: Path, target_flops: float | None = None,
                        title: str = "") -> Path:
    """Accuracy (train, validation) on top, FLOPs kept by the current mask below, both per epoch."""
    from matplotlib.ticker import MaxNLocator

    if not records:
        raise AtofxError("the log has no epoch yet; nothing to plot.")
    epochs = [r["epoch"] for r in records]
    fig = _figure(7, 5.5)
    acc, flops = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    acc.plot(epochs, [r["train_accuracy"] for r in records], marker=".", label="train")
    if all("val_accuracy" in r for r in records):
        acc.plot(epochs, [r["val_accuracy"] for r in records], marker=".", label="validation")
    acc.set_ylabel("top-1 accuracy (%)")
    acc.legend(loc="lower right")
    acc.grid(alpha=0.3)
    if title:
        acc.set_title(title)
    flops.plot(epochs, [r["flops_kept"] for r in records], marker=".", color="tab:green", label="mask")
    if target_flops is not None:
        flops.axhline(target_flops, color="tab:red", linestyle="--", linewidth=1, label=f"target {target_flops:.2f}")
    frozen = [r["epoch"] for r in records if r.get("mask_frozen")]
    if frozen:
        flops.axvline(frozen[0], color="grey", linestyle=":", linewidth=1, label="mask frozen")
    flops.set_ylim(0, 1.05)
    flops.set_ylabel("FLOPs kept")
    flops.set_xlabel("epoch")
    flops.xaxis.set_major_locator(MaxNLocator(integer=True))
    flops.legend(loc="lower left", fontsize="small")
    flops.grid(alpha=0.3)
    fig.savefig(out)
    return out


def plot_widths(layers: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """One pair of bars per layer: dense width (light) behind pruned width (dark)."""
    if not layers:
        raise AtofxError("widths.json lists no layer; nothing to plot.")
    x = list(range(len(layers)))
    fig = _figure(min(max(6.0, 0.22 * len(layers) + 2), 40.0), 4.5)
    ax = fig.subplots()
    ax.bar(x, [layer["before"] for layer in layers], color="lightgrey", width=0.8, label="dense")
    ax.bar(x, [layer["after"] for layer in layers], color="tab:blue", width=0.55, label="pruned")
    ax.set_xticks(x, [layer["name"] for layer in layers], rotation=90, fontsize=6 if len(layers) > 30 else 8)
    ax.set_xlim(-0.7, len(layers) - 0.3)
    ax.set_ylabel("output channels / features")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    before, after = sum(layer["before"] for layer in layers), sum(layer["after"] for layer in layers)
    ax.set_title((title + ": " if title else "") + f"{after}/{before} channels kept ({after / max(before, 1):.0%})")
    fig.savefig(out)
    return out


def missing_run_files(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if not (Path(run_dir) / name).is_file()]


def draw_run_plots(run_dir: str | Path) -> list[Path]:
    """Redraw accuracy_flops.png and widths.png of a run folder from its summary.json, log.jsonl and widths.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AtofxError(f"run folder {str(run_dir)!r} does not exist; give the --out folder of an `atofx train` run.")
    missing = missing_run_files(run_dir)
    if missing:
        raise AtofxError(f"{str(run_dir)!r} lacks {', '.join(missing)}: not a finished `atofx train` run "
                         "(rerun the same `atofx train` command to finish it).")
    summary = json.loads((run_dir / "summary.json").read_text())
    title = f"{summary.get('model', '?')} on {summary.get('dataset', '?')}"
    widths = json.loads((run_dir / "widths.json").read_text())
    return [plot_accuracy_flops(read_log(run_dir / "log.jsonl"), run_dir / "accuracy_flops.png",
                                summary.get("target_flops"), title),
            plot_widths(widths["layers"], run_dir / "widths.png", title)]
