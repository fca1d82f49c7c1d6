"""Which channels ATO and the static mask keep, space by space, in one run of the accuracy benchmark.

One run per method at one seed and target, trained by `tools/bench_accuracy.py`'s own steps (its
protocol, data, model, seed and one torch thread), so the masks are the ones behind that run's accuracy. It
prints every prunable channel space with its width, its share of the dense FLOPs and the channels each method
keeps. Why it exists: on the second VM `static` fell to 86.32% at seed 4 (50% pruned) where ATO had 89.59%;
its group-norm saliency mask kept 3 of the 16 channels of the first stage's residual stream (41% of the
FLOPs), ATO's controller 12 (README, Fashion-MNIST section).

    python tools/bench_widths.py --seed 4 --target 0.5                  # Fashion-MNIST, ~6-8 min a method
    python tools/bench_widths.py --dataset digits --seed 0 --methods static
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_accuracy  # noqa: E402

import atofx  # noqa: E402
from atofx.core.report import format_table, space_records  # noqa: E402


def trained(method: str, seed: int, target: float, protocol: bench_accuracy.Protocol,
            data_dir: str | None = None) -> atofx.ATOModel:
    """The benchmark's `method` run at `seed` and `target` (share of FLOPs pruned), trained by bench_accuracy's own
    steps on one thread (as its runs with --jobs 2); `ato.mask` is its mask."""
    task = bench_accuracy.base_task(protocol, data_dir=data_dir) | {"method": method, "seed": seed, "target": target}
    train, _, _, model, example, device = bench_accuracy.prepared(task)
    return bench_accuracy.train_atofx(task, model, example, train, device)[0]


def widths_table(runs: dict[str, atofx.ATOModel]) -> str:
    """One row per prunable space: index, name, width, share of the dense FLOPs, channels each run keeps; then each
    mask's FLOPs kept by the FLOPs model."""
    rows = [[r["index"], r["name"], r["width"], f"{100 * r['flops_share']:.1f}%",
             *(int(ato.mask.bits[r["index"]].sum()) for ato in runs.values())]
            for r in space_records(next(iter(runs.values()))) if not r["pinned"]]
    rows.append(["", "FLOPs kept", "", "", *(f"{ato.flops(ato.mask) / ato.flops():.3f}" for ato in runs.values())])
    return format_table(["#", "space", "width", "FLOPs", *(f"{m} keeps" for m in runs)], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.5, help="share of FLOPs pruned (default 0.5)")
    parser.add_argument("--methods", nargs="+", choices=("ato", "static"), default=["static", "ato"])
    parser.add_argument("--epochs", type=int, help="(default: the protocol's)")
    parser.add_argument("--data-dir", help="where the dataset lives (default: the Debian package's folder)")
    args = parser.parse_args(argv)
    protocol = bench_accuracy.PROTOCOLS[args.dataset]
    protocol = replace(protocol, epochs=args.epochs or protocol.epochs)
    runs = {m: trained(m, args.seed, args.target, protocol, args.data_dir) for m in args.methods}
    print(f"{protocol.model} on {protocol.dataset}, {protocol.epochs} epochs, seed {args.seed}, "
          f"{100 * args.target:.0f}% of FLOPs pruned")
    print(widths_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
