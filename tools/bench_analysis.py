"""Analysis time: atofx.compile() vs torch-pruning's DependencyGraph().build_dependency, per torchvision CNN.

Both tools get the same model object and the same example batch. Each model gets one warm-up run of
each tool, then three timed runs, interleaved (atofx, tp, atofx, tp, ...) so that machine noise hits
both alike; the table shows the medians and their ratio atofx/tp (below 1.0: atofx is faster).

    python tools/bench_analysis.py --quick --json bench-analysis.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import bench_plots
import torch
from bench_machine import machine_record

import atofx
from atofx.app import model_zoo
from atofx.core.report import format_table

QUICK = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
         "shufflenet_v2_x1_0", "regnet_y_400mf", "googlenet", "convnext_tiny"]
REPEATS = 3


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, input_size: tuple[int, ...] | None = None, repeats: int = REPEATS) -> dict:
    """Median seconds of atofx.compile and of torch-pruning's build_dependency on one model."""
    import torch_pruning as tp

    zoo = model_zoo.load(name, input_size)
    model, example = zoo.model, zoo.example

    def run_atofx() -> object:
        return atofx.compile(model, example)

    def run_tp() -> object:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)

    row: dict = {"model": name, "input": list(example.shape)}
    run_atofx()  # warm-up: imports, allocator, lazy op tables; an atofx failure ends this model
    try:
        run_tp()
    except Exception as exc:  # torch-pruning cannot analyse some models (e.g. ShuffleNetV2's reshape)
        row["tp_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_time(run_atofx))
        if "tp_error" not in row:
            theirs.append(_time(run_tp))
    row.update(atofx_s=statistics.median(ours), atofx_runs=ours)
    if theirs:
        row.update(tp_s=statistics.median(theirs), tp_runs=theirs, ratio=row["atofx_s"] / statistics.median(theirs))
    return row


def _cells(row: dict) -> list[str]:
    """One table row; a tool that failed shows its error instead of a time."""
    if "error" in row:
        return [row["model"], "-", row["error"][:90], "-", "-"]
    tp_cell = f"{row['tp_s']:.3f}" if "tp_s" in row else f"failed: {row['tp_error']}"
    ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
    return [row["model"], "x".join(map(str, row["input"][1:])), f"{row['atofx_s']:.3f}", tp_cell, ratio]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", metavar="NAME", help="torchvision model names (default: every CNN)")
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} representative CNNs")
    parser.add_argument("--input-size", metavar="CxHxW", type=model_zoo.parse_input_size, default=None,
                        help="example input without the batch dim (default: each model's own, 224 or 299)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PNG", type=Path, help="also draw the results (see tools/bench_plots.py)")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    names = args.models or (QUICK if args.quick else model_zoo.torchvision_cnns())
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    for name in names:
        try:
            row = bench_model(name, args.input_size)
        except Exception as exc:  # one failing model must not end the benchmark; the table shows it
            row = {"model": name, "error": f"atofx failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        rows.append(row)
        print(f"  {name}: " + " | ".join(_cells(row)[2:]), file=sys.stderr, flush=True)
        gc.collect()

    ratios = [r["ratio"] for r in rows if "ratio" in r]
    median_ratio = statistics.median(ratios) if ratios else float("nan")
    print(format_table(["model", "input", "atofx compile (s)", "tp build_dependency (s)", "atofx/tp"],
                       [_cells(r) for r in rows]))
    load = (load_before, os.getloadavg()[0])
    print(f"median ratio atofx/tp over {len(ratios)} models: {median_ratio:.2f} "
          f"(torch {torch.__version__}, {os.cpu_count()} CPU cores, {REPEATS} runs each, median; "
          f"1-min load average {load[0]:.1f} before, {load[1]:.1f} after)")
    machine = machine_record(threads=torch.get_num_threads(), load_average_1min=load)
    payload = {"median_ratio": median_ratio, "rows": rows, "machine": machine,
               "date": datetime.date.today().isoformat()}
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.plot and ratios:
        print(f"wrote {bench_plots.plot_analysis(payload, args.plot)}")
    return 0 if ratios else 1


if __name__ == "__main__":
    sys.exit(main())
