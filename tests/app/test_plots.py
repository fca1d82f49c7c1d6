"""accuracy_flops.png and widths.png from a run folder's files; missing files are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atofx import AtofxError
from atofx.app.plots import draw_run_plots, plot_accuracy_flops, plot_widths, read_log

PNG = b"\x89PNG\r\n\x1a\n"


def records(epochs: int = 6) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 50 + 7 * e, "flops_kept": max(0.45, 1 - 0.15 * e),
             "controller_loss": None, "mask_bits_changed": 0, "mask_frozen": e >= 4, "lr": 0.1, "val_loss": 1.0,
             "val_accuracy": 45 + 6 * e, "seconds": 1.0} for e in range(1, epochs + 1)]


LAYERS = [{"name": "conv1", "type": "Conv2d", "before": 16, "after": 9},
          {"name": "layer1.0.conv1", "type": "Conv2d", "before": 16, "after": 4},
          {"name": "fc", "type": "Linear", "before": 10, "after": 10}]


def write_run(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"summary.json": json.dumps({"model": "resnet20", "dataset": "folder", "target_flops": 0.45}),
             "log.jsonl": "".join(json.dumps(r) + "\n" for r in records()),
             "widths.json": json.dumps({"model": "resnet20", "layers": LAYERS})}
    for name, text in files.items():
        if name not in skip:
            (folder / name).write_text(text)
    return folder


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_plots_are_pngs(tmp_path):
    assert is_png(plot_accuracy_flops(records(), tmp_path / "a.png", target_flops=0.45, title="t"))
    assert is_png(plot_widths(LAYERS, tmp_path / "w.png"))
    no_val = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in records(2)]
    assert is_png(plot_accuracy_flops(no_val, tmp_path / "b.png"))
    many = [{"name": f"l{i}", "type": "Conv2d", "before": 64, "after": i % 64} for i in range(120)]
    assert is_png(plot_widths(many, tmp_path / "many.png"))


def test_draw_run_plots_writes_both(tmp_path):
    run = write_run(tmp_path / "run")
    written = draw_run_plots(run)
    assert [p.name for p in written] == ["accuracy_flops.png", "widths.png"]
    assert all(is_png(p) for p in written)


def test_missing_files_are_named(tmp_path):
    run = write_run(tmp_path / "run", skip=("log.jsonl", "widths.json"))
    with pytest.raises(AtofxError, match=r"lacks log.jsonl, widths.json: not a finished `atofx train` run"):
        draw_run_plots(run)
    with pytest.raises(AtofxError, match=r"run folder .*nothing' does not exist"):
        draw_run_plots(tmp_path / "nothing")
    assert not list(run.glob("*.png"))


def test_empty_or_damaged_inputs(tmp_path):
    with pytest.raises(AtofxError, match="no epoch yet"):
        plot_accuracy_flops([], tmp_path / "a.png")
    with pytest.raises(AtofxError, match="no layer"):
        plot_widths([], tmp_path / "w.png")
    (tmp_path / "log.jsonl").write_text("{not json\n")
    with pytest.raises(AtofxError, match="not a log.jsonl written by atofx"):
        read_log(tmp_path / "log.jsonl")
