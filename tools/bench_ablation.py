"""ATO ablation (issue 14's table): atofx's ATO as the issue found it, each change alone, all of them together.

`before` is atofx's ATO when issue 14 was filed: the proximal step `lr * lam` (a dropped group is zero within a
step or two), lambda ramped x10 after the freeze, one pass over D_CN a window epoch, the window's mask the
controller's own. Each of the issue's points 1-6 is then switched to the authors' released code alone on top of
`before` (docs/design-notes.md, "atofx, the paper and the authors' code"); `official` switches all six at once
(`flavour="official"`, one pass, as the authors'); `defaults` is today's `ATOConfig()`, what the issue's work
chose; `static` (the OTO-style fixed mask) runs beside it as the bar to clear. The protocol is
tools/bench_accuracy.py's Fashion-MNIST one (ResNet-14, 10 epochs over 14,000 images, D_CN 20% of them for every
row), 2 seeds, 50% of FLOPs pruned. Choices are made on the validation accuracy (5,000 training images kept
out); test accuracy is reported, not chosen on. "revived (peak)" is the most ZIGs a run's mask kept again, with
non-zero weights, after a projecting mask had dropped them (`zigs_revived`). Finished runs are stored
(bench_accuracy's `--runs-dir`), so an interrupted ablation resumes.

docs/ablation.md's sections 1-2 ran an earlier list of variants (each on the defaults of its day), at the
commits named there.

    python tools/bench_ablation.py --jobs 2 --json docs/results/bench-ablation-issue14.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_accuracy  # noqa: E402
from bench_machine import machine_record  # noqa: E402

from atofx.ato.config import OFFICIAL  # noqa: E402
from atofx.core.report import format_table  # noqa: E402

# atofx's ATO when issue 14 was filed, as options of today's ATOConfig
BEFORE: dict = {"step_size": "lr", "lam_schedule": "ramp", "lam_boost": 10.0, "controller_epochs": 1,
                "window_mask": "controller"}


def _official(*keys: str) -> dict:
    """`BEFORE` with the authors' choice (`OFFICIAL`) for `keys`: one of the issue's points switched alone."""
    return BEFORE | {k: OFFICIAL[k] for k in keys}


# name -> (what it changes, ato.train options); "defaults" also runs `static`
VARIANTS: dict[str, tuple[str, dict]] = {
    "before": ("atofx's ATO when issue 14 was filed", BEFORE),
    "decay": ("point 1: dropped groups decay (step lam * r_l * lr; lambda x100 at (E-5)/2)",
              _official("step_size", "lam_schedule", "lam_boost")),
    "hsp": ("point 2: OTO's half-space projector, eps 0.1", BEFORE | {"projection": "hsp"}),
    "sampling": ("point 3: one Gumbel sample, soft mask in CE, hard in FLOPs", _official("sampling")),
    "regularizer": ("point 4: two-sided regulariser x2, AdamW controller, heads without bias",
                    _official("regularizer", "controller_optimizer", "head_bias")),
    "freeze": ("point 5: the frozen mask is the controller's, no bisection", _official("freeze_mask")),
    "internal": ("point 6: gates inside residual blocks only", _official("search_space")),
    "official": ("points 1-6 together: the authors' code (one pass over D_CN, as theirs)",
                 {"flavour": "official", "controller_epochs": 1}),
    "defaults": ("today's defaults (ATOConfig())", {}),
}


def run(names: list[str], seeds: int, jobs: int, store: bench_accuracy.RunStore | None,
        protocol: bench_accuracy.Protocol, target: float = 0.5, data_dir: str | None = None) -> list[dict]:
    """One row per variant (and `static`): test and validation accuracy, FLOPs kept, revivals, time."""
    rows = []
    for name in names:
        what, options = VARIANTS[name]
        methods = ("ato", "static") if name == "defaults" else ("ato",)
        runs = bench_accuracy.run_all(list(range(seeds)), (target,), protocol, jobs=jobs, methods=methods,
                                      data_dir=data_dir, ato_options=options, store=store)
        for method in methods:
            sel = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
            rows.append({"variant": name if method == "ato" else "static", "what": what if method == "ato" else
                         "the OTO-style fixed mask (method='static')", "options": options,
                         "acc_mean": statistics.mean(r["accuracy"] for r in sel),
                         "val_acc_mean": statistics.mean(r["val_accuracy"] for r in sel),
                         "flops_kept_mean": statistics.mean(r["flops_kept"] for r in sel),
                         "revived_max_mean": statistics.mean(r.get("zigs_revived_max", 0) for r in sel),
                         "seconds_mean": statistics.mean(r["seconds"] for r in sel),
                         "accuracies": [r["accuracy"] for r in sel], "val_accuracies": [r["val_accuracy"] for r in sel],
                         "runs": sel})
    return rows


def table(rows: list[dict]) -> str:
    return format_table(["variant", "test acc %", "val acc %", "FLOPs kept", "revived (peak)", "train s", "per seed"],
                        [[r["variant"], f"{r['acc_mean']:.2f}", f"{r['val_acc_mean']:.2f}",
                          f"{r['flops_kept_mean']:.3f}", f"{r['revived_max_mean']:.1f}", f"{r['seconds_mean']:.0f}",
                          " / ".join(f"{a:.2f}" for a in r["accuracies"])] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                        help="(default: all, in the order of the table)")
    parser.add_argument("--seeds", type=int, default=2, help="(default 2)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each")
    parser.add_argument("--data-dir", help="Fashion-MNIST's folder (default: the Debian package's)")
    parser.add_argument("--runs-dir", type=Path, default=Path("atofx-out/bench-accuracy-runs"),
                        help="finished runs are stored here and reused by the same code (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    protocol = bench_accuracy.PROTOCOLS["fashion-mnist"]
    store = bench_accuracy.RunStore(args.runs_dir, bench_accuracy.source_digest())
    rows = run(args.variants, args.seeds, args.jobs, store, protocol, data_dir=args.data_dir)
    print(table(rows))
    best = max((r for r in rows if r["variant"] != "static"), key=lambda r: r["val_acc_mean"])
    print(f"best on the validation split: {best['variant']} ({best['val_acc_mean']:.2f}%)")
    if args.json:
        payload = {"rows": rows, "best_on_validation": best["variant"], "protocol": protocol.__dict__,
                   "seeds": args.seeds, "target_pruned": 0.5, "seconds": time.perf_counter() - started,
                   "command": " ".join(["python tools/bench_ablation.py", *(argv if argv is not None else sys.argv[1:])]),
                   "machine": machine_record(),
                   "date": datetime.date.today().isoformat()}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
