"""Training overhead of ATO: ATO epoch time / plain PyTorch epoch time, same model, data and optimizer.

Three kinds of epoch are timed in one process, interleaved, several repeats: plain (optimizer
steps only), ATO outside the controller window (steps + group projection on a half-dropped mask)
and ATO inside the window (the same plus the controller's pass over D_CN). Each repeat runs the
three once, in an order that rotates from repeat to repeat, and gives its own ratios to plain;
the ratios reported are the medians of these paired ratios, so that the machine's slow drifts
(which on a shared VM move whole epochs by 5-30%) cancel within a repeat; the digits model, whose
epochs are short, gets five times the repeats. Prints a table;
`--json PATH` writes `ratio_inside_window` and `ratio_outside_window` per model.

    python tools/bench_overhead.py            # full: CIFAR ResNet-56 on 32x32 tensors, digits ResNet-20
    python tools/bench_overhead.py --quick    # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import bench_plots
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import atofx
from atofx.cifar_models import resnet20, resnet56
from atofx.datasets import digits
from atofx.plain_training import default_optimizer, train_epoch
from atofx.report import format_table
from atofx.trainer import ATOTrainer, controller_epoch, controller_subset, train_one_epoch

# The digits epochs are about a tenth of the CIFAR ones, and a shared machine's noise is a larger share of a
# short epoch: the digits model gets this many times the repeats.
DIGITS_REPEAT_FACTOR = 5


def _setups(quick: bool) -> list[tuple[str, nn.Module, DataLoader, tuple[int, ...], int]]:
    gen = torch.Generator().manual_seed(0)
    n = 512 if quick else 5000
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    cifar = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=gen)
    train, _ = digits(0)
    digit_loader = DataLoader(train, batch_size=64, shuffle=True, generator=gen)
    return [
        ("resnet56 / 32x32 tensors", resnet56(10, 3), cifar, (1, 3, 32, 32), 1),
        ("resnet20 / digits", resnet20(10, 1), digit_loader, (1, 1, 8, 8), DIGITS_REPEAT_FACTOR),
    ]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model: nn.Module, loader: DataLoader, shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    plain_model = copy.deepcopy(model)
    plain_opt, _ = default_optimizer(plain_model, 10)
    ato = atofx.compile(model, (torch.randn(shape),))
    trainer = ATOTrainer(ato, atofx.trainer.ATOConfig(target_flops=0.5, controller_data=0.05), 10,
                         torch.device("cpu"))
    opt, _ = default_optimizer(model, 10)
    trainer.mask = {k: (torch.rand(v.shape, generator=torch.Generator().manual_seed(k)) > 0.5).float()
                    for k, v in trainer.mask.items()}
    cn = controller_subset(loader, 0.05, 0)
    loss = nn.functional.cross_entropy

    def plain() -> None:
        train_epoch(plain_model, loader, plain_opt, loss, torch.device("cpu"))

    def outside() -> None:
        trainer.state.epoch, trainer.state.frozen = trainer.phases.end, True
        train_one_epoch(trainer, loader, opt, loss)

    def inside() -> None:
        trainer.state.epoch, trainer.state.frozen = trainer.phases.start + 1, False
        mask = dict(trainer.mask)
        train_one_epoch(trainer, loader, opt, loss)
        controller_epoch(trainer, cn, loss)
        trainer.mask = mask  # keep the projected set fixed across repeats

    kinds = {"plain": plain, "outside": outside, "inside": inside}
    for fn in kinds.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(repeats):
        for k in order[r % 3:] + order[: r % 3]:
            times[k].append(_timed(kinds[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(t / p for t, p in zip(times[k], times["plain"], strict=True))
              for k in ("outside", "inside")}
    return {"plain_s": med["plain"], "outside_s": med["outside"], "inside_s": med["inside"],
            "ratio_outside_window": paired["outside"], "ratio_inside_window": paired["inside"], "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 random CIFAR-sized images, 7 repeats (digits: 35)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"repeats per model (default 5, quick 7; the digits model gets {DIGITS_REPEAT_FACTOR}x)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PNG", type=Path, help="also draw the results (see tools/bench_plots.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (7 if args.quick else 5)
    rows, results = [], {}
    for name, model, loader, shape, factor in _setups(args.quick):
        n = repeats * factor
        r = measure(model, loader, shape, n)
        results[name] = r | {"repeats": n}
        rows.append([name, str(n), f"{r['plain_s']:.2f}", f"{r['outside_s']:.2f}", f"{r['inside_s']:.2f}",
                     f"{r['ratio_outside_window']:.3f}", f"{r['ratio_inside_window']:.3f}"])
    print(format_table(["model / data", "repeats", "plain s", "ATO outside s", "ATO inside s", "ratio outside",
                        "ratio inside"], rows))
    print(f"times: medians of the interleaved repeats; ratios: medians of the paired per-repeat ratios; "
          f"torch threads {args.threads}")
    payload = {"models": results, "repeats": repeats, "threads": args.threads,
               "ratio_outside_window": max(r["ratio_outside_window"] for r in results.values()),
               "ratio_inside_window": max(r["ratio_inside_window"] for r in results.values())}
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {bench_plots.plot_overhead(payload, args.plot)}")


if __name__ == "__main__":
    main()
