"""Pruned speed: dense CPU latency / pruned CPU latency, next to dense FLOPs / pruned FLOPs.

Masks come from the controller's FLOPs model on random weights (no training): `uniform_mask`
keeps the same share r of every prunable channel space (random channels, `Mask.random`) and
bisects r until `ato.flops(mask)`, the differentiable FLOPs model the controller is trained
against, keeps the target share of the dense FLOPs within 1% (absolute). Each mask is then cut
out with `ato.prune(mask)` (equivalence checked). Latency: eval mode, `torch.no_grad()`, torch on
2 threads, warm-up runs, then the dense model and its pruned versions run round-robin (dense,
30%, 50%, 70%, dense, ...) so that machine noise hits all alike; the median of the repeats.
Each measurement is taken in both memory formats, dense and pruned alike: NCHW ("contiguous",
eager PyTorch's default) and NHWC ("channels_last", what PyTorch recommends for CNN inference on
the CPU: oneDNN then needs no blocked copy padded to 8 or 16 channels, which pruned widths rarely are).

    python tools/bench_latency.py --quick --json bench-latency.json   # ResNet-50 at 50% pruned, batch 1 and 32
    python tools/bench_latency.py                                     # ResNet-50, MobileNetV2, CIFAR ResNet-56
    python tools/bench_latency.py --round-to 1 16                     # each row also with widths rounded to 16
"""

from __future__ import annotations

import argparse
import copy
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
import torchvision
from bench_machine import machine_record
from torch import nn

import atofx
from atofx.app.cifar_models import resnet56
from atofx.core.mask import Mask
from atofx.core.report import format_table

TARGETS = (0.3, 0.5, 0.7)  # share of the dense FLOPs removed ("pruned FLOPs", as the paper reports it)
BATCHES = (1, 32)
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (3, 224, 224)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (3, 224, 224)),
    "resnet56 (CIFAR)": (lambda: resnet56(10, 3), (3, 32, 32)),
}


def uniform_mask(ato: atofx.ATOModel, keep_flops: float, seed: int = 0, tol: float = 0.01,
                 steps: int = 40, round_to: int = 1) -> tuple[Mask, float]:
    """A mask keeping `keep_flops` of the dense FLOPs (within `tol`, absolute) by the FLOPs model.

    Keeps the same random share r of every prunable space (`Mask.random(zigs, r, seed)`: for one
    seed the kept sets are nested as r grows, so the FLOPs are monotone in r) and bisects r.
    Returns the mask and the FLOPs share it keeps; raises ValueError when rounding to whole channels
    leaves no r within `tol` (a model with very few, very narrow spaces). With `round_to`, every space keeps
    a multiple of that many channels (`Mask.random(..., round_to)`), as `ATOConfig(round_to=...)` does.
    """
    if not 0.0 < keep_flops <= 1.0:
        raise ValueError(f"keep_flops must be in (0, 1], got {keep_flops}.")
    total = ato.flops()
    best: tuple[float, Mask, float] | None = None
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        r = (lo + hi) / 2
        mask = Mask.random(ato.zigs, r, seed, round_to)
        share = ato.flops(mask) / total
        if best is None or abs(share - keep_flops) < best[0]:
            best = (abs(share - keep_flops), mask, share)
        if share > keep_flops:
            hi = r
        else:
            lo = r
        if best[0] <= tol / 4:
            break
    assert best is not None
    if best[0] > tol:
        raise ValueError(f"no uniform keep share gives {keep_flops:.3f} of the FLOPs within {tol}; closest {best[2]:.3f}.")
    return best[1], best[2]


def _latency(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def bench_model(name: str, targets: tuple[float, ...], batches: tuple[int, ...], repeats: int,
                warmup: int, seed: int = 0, formats: tuple[str, ...] = tuple(MEMORY_FORMATS),
                round_to: int = 1) -> list[dict]:
    """Rows (model, memory_format, batch, pruned_flops, flops_speedup, latency_speedup, ...) for one model."""
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    dense = factory().eval()
    ato = atofx.compile(dense, (torch.randn(1, *shape),))
    total = ato.flops()
    pruned: list[tuple[float, float, nn.Module]] = []
    for t in targets:
        # whole multiples of round_to move the FLOPs in steps: accept the nearest share within 5 points
        mask, kept = uniform_mask(ato, 1.0 - t, seed, tol=0.01 if round_to == 1 else 0.05, round_to=round_to)
        pruned.append((t, kept, ato.prune(mask).eval()))
    rows = []
    with torch.no_grad():
        originals = [dense] + [m for _, _, m in pruned]
        copies = {f: [copy.deepcopy(m).to(memory_format=MEMORY_FORMATS[f]) for m in originals] for f in formats}
        for fmt, batch in ((f, b) for f in formats for b in batches):
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
            x = x.to(memory_format=MEMORY_FORMATS[fmt])
            models = copies[fmt]
            for _ in range(warmup):
                for m in models:
                    m(x)
            times: list[list[float]] = [[] for _ in models]
            for _ in range(repeats):
                for i, m in enumerate(models):
                    times[i].append(_latency(m, x))
            med = [statistics.median(t) for t in times]
            for (t, kept, _), m_s, runs in zip(pruned, med[1:], times[1:], strict=True):
                # each round's dense time over the same round's pruned time: a slow stretch of the machine
                # falls on both
                paired = statistics.median(d / p for d, p in zip(times[0], runs, strict=True))
                rows.append({"model": name, "memory_format": fmt, "round_to": round_to, "batch": batch,
                             "pruned_flops": 1.0 - kept,
                             "target_pruned_flops": t,
                             "dense_mflops": total / 1e6, "flops_speedup": 1.0 / kept,
                             "dense_ms": 1e3 * med[0], "pruned_ms": 1e3 * m_s, "latency_speedup": paired,
                             "dense_runs_s": times[0], "pruned_runs_s": runs})
            print(f"  {name} {fmt} batch {batch}: dense {1e3 * med[0]:.1f} ms, pruned "
                  + ", ".join(f"{1e3 * m:.1f}" for m in med[1:]) + " ms", file=sys.stderr, flush=True)
    return rows


def _cells(r: dict) -> list[str]:
    ratio = r["latency_speedup"] / r["flops_speedup"]
    return [r["model"], r["memory_format"], str(r["round_to"]), str(r["batch"]), f"{100 * r['pruned_flops']:.1f}%",
            f"{r['dense_ms']:.1f}",
            f"{r['pruned_ms']:.1f}",
            f"{r['flops_speedup']:.2f}x", f"{r['latency_speedup']:.2f}x", f"{ratio:.2f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-50 at 50%% pruned only, batch 1 and 32, 5 repeats")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: all three")
    parser.add_argument("--targets", nargs="+", type=float, help="shares of FLOPs removed (default 0.3 0.5 0.7)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model and batch (default 11, quick 5)")
    parser.add_argument("--memory-formats", nargs="+", choices=list(MEMORY_FORMATS), default=list(MEMORY_FORMATS),
                        help="layouts to time dense and pruned in (default: both)")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1], metavar="N",
                        help="keep a multiple of N channels per space, as ATOConfig(round_to=N) does; several values "
                             "give a set of rows each (default: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PNG", type=Path, help="also draw the results (see tools/bench_plots.py)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    names = args.models or (["resnet50"] if args.quick else list(MODELS))
    targets = tuple(args.targets or ((0.5,) if args.quick else TARGETS))
    repeats = args.repeats or (5 if args.quick else 11)
    warmup = 2
    load_before = os.getloadavg()
    rows: list[dict] = []
    for name in names:
        for round_to in args.round_to:
            rows += bench_model(name, targets, BATCHES, repeats, warmup, args.seed, tuple(args.memory_formats),
                                round_to)
            gc.collect()
    load_after = os.getloadavg()
    print(format_table(["model", "layout", "round to", "batch", "FLOPs pruned", "dense ms", "pruned ms", "FLOPs speedup",
                        "latency speedup", "latency/FLOPs"], [_cells(r) for r in rows]))
    print(f"times: median of {repeats} interleaved runs after {warmup} warm-up runs; latency speedup: median of the "
          f"per-run dense/pruned ratios; torch {torch.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPU cores; load average (1/5/15 min) "
          f"{'/'.join(f'{v:.1f}' for v in load_before)} before, {'/'.join(f'{v:.1f}' for v in load_after)} after")
    machine = machine_record(threads=args.threads, load_average_before=load_before, load_average_after=load_after)
    payload = {"rows": rows, "repeats": repeats, "warmup": warmup, "machine": machine,
               "date": datetime.date.today().isoformat()}
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {bench_plots.plot_latency(payload, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
