"""Training overhead of ATO: ATO epoch time / plain PyTorch epoch time, same model, data and optimizer.

Three kinds of epoch are timed in one process, interleaved, several repeats: plain (optimizer
steps only), ATO outside the controller window (steps + group projection on a half-dropped mask)
and ATO inside the window (the same plus the controller's pass over D_CN). Within a repeat the
three epochs run side by side, taking turns one batch at a time (`Lockstep`), and each epoch's
time is the sum of its own turns: the machine's drifts (which on a shared VM move whole epochs by
5-30%) then fall on all three alike, where epochs run one after the other would each meet
different ones. Each repeat gives its own ratios to plain; the ratios reported are their medians;
the digits model, whose epochs are short, gets five times the repeats. Prints a table and each model's
ratios by third of the repeats (`by_third`: a drift shows there); `--json PATH` writes `ratio_inside_window`,
`ratio_outside_window` and the thirds per model.

    python tools/bench_overhead.py            # full: CIFAR ResNet-56 on 32x32 tensors, digits ResNet-20
    python tools/bench_overhead.py --quick    # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import bench_plots
import torch
from bench_machine import machine_record
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import atofx
from atofx.app.cifar_models import resnet20, resnet56
from atofx.app.datasets import digits
from atofx.ato.controller import controller_subset
from atofx.ato.loop import controller_epoch, train_one_epoch
from atofx.ato.plain_training import default_optimizer, train_epoch
from atofx.ato.trainer import ATOTrainer
from atofx.core.report import format_table

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


class Lockstep:
    """Runs epoch functions in threads that take turns one batch at a time, and times each one's turns.

    Each function gets its own pass over the same data: after each batch's step it hands the turn to the
    next unfinished function and waits for its own next turn. Only the holder of the turn runs, so the
    kinds never compete for the cores; the hand-over itself is outside every clock.
    """

    def __init__(self, n: int, first: int = 0):
        self._turn, self._n = first, n
        self._done = [False] * n
        self._changed = threading.Condition()
        self._started = [0.0] * n
        self.elapsed = [0.0] * n

    def _wait(self, i: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._turn == i)
        self._started[i] = time.perf_counter()

    def _hand_over(self, i: int, finished: bool = False) -> None:
        self.elapsed[i] += time.perf_counter() - self._started[i]
        with self._changed:
            self._done[i] = finished
            waiting = [j % self._n for j in range(i + 1, i + 1 + self._n) if not self._done[j % self._n]]
            if waiting:
                self._turn = waiting[0]
                self._changed.notify_all()

    def _taking_turns(self, i: int, data: Iterable) -> Iterable:
        """`data` for function i, handing the turn over after each batch."""
        lockstep = self

        class TakingTurns:
            def __len__(self) -> int:
                return len(data)  # type: ignore[arg-type]

            def __iter__(self) -> Iterator[Any]:
                for batch in data:
                    yield batch
                    lockstep._hand_over(i)
                    lockstep._wait(i)

        return TakingTurns()

    def run(self, epochs: list[Callable[[Iterable], None]], data: Iterable) -> list[float]:
        """Run each function on its pass over `data` to its end; seconds each one held the turn."""
        errors: list[BaseException] = []

        def body(i: int) -> None:
            self._wait(i)
            try:
                epochs[i](self._taking_turns(i, data))
            except BaseException as exc:  # re-raised in the caller's thread below
                errors.append(exc)
            finally:
                self._hand_over(i, finished=True)

        threads = [threading.Thread(target=body, args=(i,)) for i in range(self._n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return self.elapsed


def half_dropped_trainer(model: nn.Module, shape: tuple[int, ...]) -> tuple[ATOTrainer, torch.optim.Optimizer]:
    """An ATO trainer over `model` (inputs of `shape`) whose mask drops a fixed random half of every space, and the
    default optimiser over the parameters it steps."""
    ato = atofx.compile(model, (torch.randn(shape),))
    # one pass over D_CN a window epoch: the paper-scale cost (a short run's controller may take up to
    # MAX_AUTO_PASSES passes, ATOConfig.passes; that cost shows in bench_accuracy's "train s")
    trainer = ATOTrainer(ato, atofx.ato.config.ATOConfig(target_flops=0.5, controller_data=0.05, controller_epochs=1),
                         10, torch.device("cpu"))
    opt, _ = default_optimizer(model, 10)
    trainer.mask = {k: (torch.rand(v.shape, generator=torch.Generator().manual_seed(k)) > 0.5).float()
                    for k, v in trainer.mask.items()}
    return trainer, opt


def measure(model: nn.Module, loader: DataLoader, shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    plain_model = copy.deepcopy(model)
    plain_opt, _ = default_optimizer(plain_model, 10)
    trainer, opt = half_dropped_trainer(model, shape)
    cn = controller_subset(loader, 0.05, 0)
    loss = nn.functional.cross_entropy

    def plain(data: Iterable) -> None:
        train_epoch(plain_model, data, plain_opt, loss, torch.device("cpu"))

    def outside(data: Iterable) -> None:
        trainer.state.epoch, trainer.state.frozen = trainer.phases.end, True
        train_one_epoch(trainer, data, opt, loss)

    def inside(data: Iterable) -> None:
        trainer.state.epoch, trainer.state.frozen = trainer.phases.start + 1, False
        mask = dict(trainer.mask)
        train_one_epoch(trainer, data, opt, loss)
        controller_epoch(trainer, cn, loss)
        trainer.mask = mask  # keep the projected set fixed across repeats

    kinds = {"plain": plain, "outside": outside, "inside": inside}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats + 1):  # the first round warms up
        elapsed = Lockstep(len(kinds), first=r % len(kinds)).run(list(kinds.values()), loader)
        if r:
            for k, t in zip(kinds, elapsed, strict=True):
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: [t / p for t, p in zip(times[k], times["plain"], strict=True)] for k in ("outside", "inside")}
    return {"plain_s": med["plain"], "outside_s": med["outside"], "inside_s": med["inside"],
            "ratio_outside_window": statistics.median(ratios["outside"]),
            "ratio_inside_window": statistics.median(ratios["inside"]),
            "ratio_outside_by_third": by_third(ratios["outside"]), "ratio_inside_by_third": by_third(ratios["inside"]),
            "times_s": times}


def by_third(ratios: list[float]) -> list[float]:
    """Medians of the first, middle and last third of the repeats' ratios. A ratio that rises through a run
    points at state the ATO model builds up: the digits ratios once rose 1.03 -> 1.12 this way, from momentum
    stuck at a denormal (atofx/ato/denormals.py)."""
    cuts = [i * len(ratios) // 3 for i in range(4)]
    return [statistics.median(ratios[a:b]) for a, b in itertools.pairwise(cuts) if b > a]


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
    print(f"times: medians of the repeats, each running the three epochs in turns of one batch; ratios: medians "
          f"of the per-repeat ratios; "
          f"torch threads {args.threads}")
    for name, r in results.items():
        print(f"{name}, ratios by third of the repeats: outside "
              + " ".join(f"{x:.3f}" for x in r["ratio_outside_by_third"]) + ", inside "
              + " ".join(f"{x:.3f}" for x in r["ratio_inside_by_third"]))
    payload = {"models": results, "repeats": repeats, "threads": args.threads,
               "ratio_outside_window": max(r["ratio_outside_window"] for r in results.values()),
               "ratio_inside_window": max(r["ratio_inside_window"] for r in results.values()),
               "machine": machine_record(), "date": datetime.date.today().isoformat()}
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {bench_plots.plot_overhead(payload, args.plot)}")


if __name__ == "__main__":
    main()
