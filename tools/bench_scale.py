"""Memory and scale: compile and prune time and peak RSS on large torchvision CNNs, and RSS over many cycles.

Each large model runs in a fresh subprocess, so its peak RSS is its own: the model is built (weights=None),
then `atofx.compile(model, example)` and `ato.prune(ato.random_mask(0.5))` (with the equivalence check) are
timed. Then a ResNet-50 goes through repeated compile -> random mask -> prune cycles in one process; the RSS
(after a garbage collection) at cycle 10 and at the last cycle shows whether memory grows (target: <= 5%).

    python tools/bench_scale.py --quick --json bench-scale.json   # 112x112 / 64x64 inputs, 20 cycles
    python tools/bench_scale.py                                    # 224x224, 100 cycles
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_machine import machine_record

import atofx
from atofx.core.report import format_table

MODELS = ["resnet152", "densenet201", "efficientnet_b7", "regnet_y_16gf"]
FULL_SIZE, QUICK_SIZE = 224, 112
CYCLE_MODEL, FULL_CYCLES, QUICK_CYCLES, CYCLE_SIZE_QUICK = "resnet50", 100, 20, 64
BASELINE_CYCLE = 10
GROWTH_TARGET = 0.05


def rss_mb() -> float:
    """Current resident set size in MB (psutil if installed, else /proc/self/status VmRSS)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return _proc_status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (getrusage; /proc/self/status VmHWM where it is missing)."""
    try:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        return kb / 2**20 if sys.platform == "darwin" else kb / 1024
    except (AttributeError, OSError):
        return _proc_status_kb("VmHWM") / 1024


def _proc_status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _build(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def bench_one(name: str, size: int) -> dict[str, Any]:
    """Compile and prune one model in this process; meant to run in a fresh subprocess."""
    model = _build(name)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    built = rss_mb()
    start = time.perf_counter()
    ato = atofx.compile(model, example)
    compile_s = time.perf_counter() - start
    mask = ato.random_mask(keep=0.5, seed=0)
    start = time.perf_counter()
    small = ato.prune(mask)  # check=True: the pruned model must reproduce the masked one
    prune_s = time.perf_counter() - start
    return {
        "model": name,
        "input": [1, 3, size, size],
        "params_m": atofx.count_params(model) / 1e6,
        "params_pruned_m": atofx.count_params(small) / 1e6,
        "nodes": len(ato.graph_module.graph.nodes),
        "spaces": len(ato.spaces),
        "prunable": len(ato.zigs.prunable),
        "compile_s": compile_s,
        "prune_s": prune_s,
        "rss_model_mb": built,
        "peak_rss_mb": peak_rss_mb(),
    }


def cycles(name: str, size: int, n: int) -> dict[str, Any]:
    """RSS over `n` compile -> random mask -> prune cycles of one model (built once)."""
    model = _build(name)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    rss: list[float] = []
    start = time.perf_counter()
    for i in range(n):
        ato = atofx.compile(model, example)
        small = ato.prune(ato.random_mask(keep=0.5, seed=i))
        del ato, small
        gc.collect()
        rss.append(rss_mb())
    base = rss[BASELINE_CYCLE - 1]
    return {
        "model": name,
        "input": [1, 3, size, size],
        "cycles": n,
        "seconds_per_cycle": (time.perf_counter() - start) / n,
        "rss_first_mb": rss[0],
        "rss_cycle10_mb": base,
        "rss_last_mb": rss[-1],
        "growth": rss[-1] / base - 1.0,
        "rss_mb": rss,
        "peak_rss_mb": peak_rss_mb(),
    }


def _in_subprocess(args: list[str]) -> dict[str, Any]:
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": args[1], "error": tail[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SIZE}x{QUICK_SIZE} inputs; {QUICK_CYCLES} ResNet-50 cycles at "
                        f"{CYCLE_SIZE_QUICK}x{CYCLE_SIZE_QUICK}")
    parser.add_argument("--models", nargs="*", default=MODELS, help="torchvision model names (default: %(default)s)")
    parser.add_argument("--_one", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--_cycles", nargs=3, metavar=("MODEL", "SIZE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args._one:
        print(json.dumps(bench_one(args._one[0], int(args._one[1]))))
        return 0
    if args._cycles:
        print(json.dumps(cycles(args._cycles[0], int(args._cycles[1]), int(args._cycles[2]))))
        return 0

    size = QUICK_SIZE if args.quick else FULL_SIZE
    rows = []
    for name in args.models:
        row = _in_subprocess(["--_one", name, str(size)])
        rows.append(row)
        if "error" in row:
            print(f"{name}: {row['error']}", file=sys.stderr)
    n, csize = (QUICK_CYCLES, CYCLE_SIZE_QUICK) if args.quick else (FULL_CYCLES, FULL_SIZE)
    cyc = _in_subprocess(["--_cycles", CYCLE_MODEL, str(csize), str(n)])

    ok = [r for r in rows if "error" not in r]
    print(f"compile and prune (random mask keep 0.5, equivalence checked), one fresh process per model, "
          f"{torch.get_num_threads()} thread(s)")
    print(format_table(
        ["model", "input", "params M", "pruned M", "nodes", "spaces (prunable)", "compile s", "prune s",
         "RSS model MB", "peak RSS MB"],
        [[r["model"], "x".join(map(str, r["input"])), f"{r['params_m']:.1f}", f"{r['params_pruned_m']:.1f}",
          str(r["nodes"]), f"{r['spaces']} ({r['prunable']})", f"{r['compile_s']:.2f}", f"{r['prune_s']:.2f}",
          f"{r['rss_model_mb']:.0f}", f"{r['peak_rss_mb']:.0f}"] for r in ok]))
    if "error" in cyc:
        print(f"cycles: {cyc['error']}", file=sys.stderr)
    else:
        verdict = "OK" if cyc["growth"] <= GROWTH_TARGET else "OVER TARGET"
        print(f"\n{cyc['cycles']} compile/prune cycles of {cyc['model']} at {'x'.join(map(str, cyc['input']))} "
              f"({cyc['seconds_per_cycle']:.2f} s each)")
        print(format_table(["RSS after cycle 1 MB", f"cycle {BASELINE_CYCLE} MB", f"cycle {cyc['cycles']} MB",
                            f"growth {BASELINE_CYCLE}->{cyc['cycles']}", "target"],
                           [[f"{cyc['rss_first_mb']:.0f}", f"{cyc['rss_cycle10_mb']:.0f}", f"{cyc['rss_last_mb']:.0f}",
                             f"{100 * cyc['growth']:+.1f}%", f"<= {100 * GROWTH_TARGET:.0f}% ({verdict})"]]))
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
            "machine": machine_record(), "atofx": atofx.__version__,
            "threads": torch.get_num_threads(), "models": rows, "cycles": cyc}, indent=1))
    failed = len(ok) < len(rows) or "error" in cyc
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
