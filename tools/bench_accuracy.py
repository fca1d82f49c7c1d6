"""Accuracy at equal FLOPs: dense vs ATO vs static-mask (OTO-style) vs L1-norm and random pruning + fine-tuning.

Digits data (scikit-learn's bundled 8x8 handwritten digits, no download), CIFAR-style ResNet-20 with one
input channel, the `atofx train` recipe (SGD lr 0.1, momentum 0.9, nesterov, weight decay 5e-4, cosine
schedule, batch 64). Every method gets the same total number of epochs E:

- dense: E epochs, no pruning;
- ATO: `ato.train(..., method="ato", controller_data=0.5)` for E epochs (the digits recipe's D_CN), then
  `ato.prune()`, no fine-tuning;
- static: the same with `method="static"` (one mask from group-norm saliency at the window start, never
  changed: the OTO-style baseline);
- L1: E/2 dense epochs (cosine over E/2), then one-shot pruning: each prunable space's ZIGs are ranked by
  the L1 norm of their "out" parameters (conv filters, BN weight and bias) divided by the space's mean, one
  global threshold is bisected so that the FLOPs model keeps at most the target share, and dropped ZIGs are
  added back greedily, highest score first, while the target still holds; `ato.prune(mask)`, then E - E/2
  fine-tuning epochs (cosine from `--finetune-lr`, default 0.01);
- random: the same E/2 dense model, a random mask keeping the same share of every space
  (`bench_latency.uniform_mask`, FLOPs within 1% of the target), then the same fine-tuning.

Accuracy is measured on the held-out 20% of digits (the split depends on the seed), on the pruned model.
Reported: mean and sample standard deviation over seeds, and the FLOPs share kept by the FLOPs model.
With `--data-dir D` holding CIFAR-10 (torchvision's python batches, `cifar-10-batches-py/`), the same
comparison runs on CIFAR-10 (crop + flip augmentation, test set) with ResNet-56 (`--model` to change);
it needs a GPU box or days of CPU: 3 seeds x 13 runs of ResNet-56.

    python tools/bench_accuracy.py --quick --json bench-accuracy.json   # 1 seed, 30 epochs, 50% pruned (about 2 min)
    python tools/bench_accuracy.py --jobs 2                             # 3 seeds, 30 epochs, 30/50/70% pruned
    python tools/bench_accuracy.py --methods ato --lam 1 --jobs 2       # ATO alone, another lambda
    python tools/bench_accuracy.py --data-dir ~/data --epochs 160 --device cuda   # CIFAR-10, ResNet-56
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_plots  # noqa: E402
from bench_latency import uniform_mask  # noqa: E402

import atofx  # noqa: E402
from atofx.cifar_models import CIFAR_MODELS  # noqa: E402
from atofx.datasets import digits_loaders, load_images, loaders  # noqa: E402
from atofx.mask import Mask  # noqa: E402
from atofx.plain_training import train_plain  # noqa: E402
from atofx.report import format_table  # noqa: E402
from atofx.trainer import evaluate  # noqa: E402

TARGETS = (0.3, 0.5, 0.7)  # share of the dense FLOPs removed
METHODS = ("dense", "ato", "static", "l1", "random")
PAPER_LAMBDA = 10.0


# ---------------------------------------------------------------------- L1-norm one-shot pruning
def l1_scores(ato: atofx.ATOModel) -> dict[int, torch.Tensor]:
    """Per prunable space index: the L1 norm of each ZIG's "out" parameters (float64, one entry per ZIG)."""
    zigs = ato.zigs
    params = dict(ato.graph_module.named_parameters())
    total = torch.zeros(len(zigs.comp_space), dtype=torch.float64)
    seen: set[tuple[str, int, bytes]] = set()
    for s in zigs.slices:
        name = f"{s.module}.{s.name}" if s.module else s.name
        key = (name, s.dim, np.asarray(s.ids).tobytes())
        if s.role != "out" or name not in params or key in seen:  # a layer called twice: count its rows once
            continue
        seen.add(key)
        p = params[name].detach().abs().to(torch.float64).cpu()
        if p.ndim > 1:
            p = p.sum(dim=[d for d in range(p.ndim) if d != s.dim])
        total.index_add_(0, torch.as_tensor(zigs.labels[s.ids], dtype=torch.long), p)
    return {sp.index: total[torch.as_tensor(sp.components, dtype=torch.long)] for sp in zigs.prunable}


def threshold_mask(ato: atofx.ATOModel, scores: dict[int, torch.Tensor], keep_flops: float) -> tuple[Mask, float]:
    """Keep the ZIGs of highest relative score (score / space mean) so the FLOPs model keeps <= `keep_flops`.

    One global threshold is bisected; the best ZIG of each space is always kept. ZIGs below the threshold
    are then added back, highest relative score first, while the FLOPs target still holds, so the mask
    lands just under the target. Returns the mask and the FLOPs share it keeps.
    """
    total = ato.flops()
    rel = {k: v / v.mean().clamp_min(1e-12) for k, v in scores.items()}

    def at(t: float) -> dict[int, torch.Tensor]:
        out = {}
        for k, r in rel.items():
            b = r >= t
            b[r.argmax()] = True
            out[k] = b
        return out

    def share(bits: dict[int, torch.Tensor]) -> float:
        return ato.flops(Mask(bits)) / total

    lo, hi = 0.0, max(float(r.max()) for r in rel.values()) + 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if share(at(mid)) > keep_flops:
            lo = mid
        else:
            hi = mid
    bits = at(hi)
    candidates = sorted(((float(r[i]), k, i) for k, r in rel.items() for i in np.flatnonzero(~bits[k].numpy())),
                        reverse=True)
    for _, k, i in candidates:
        bits[k][i] = True
        if share(bits) > keep_flops:
            bits[k][i] = False
    return Mask(bits), share(bits)


# ---------------------------------------------------------------------- one run of each method
def _data(task: dict) -> tuple[object, object, tuple[int, ...]]:
    """(train loader, val loader, example shape) of the task's dataset: digits, or CIFAR-10 from its data_dir."""
    if task["data_dir"] is None:
        train, val = digits_loaders(64, task["seed"])
        return train, val, (1, 1, 8, 8)
    data = load_images("cifar10", task["data_dir"], 32)
    train, val = loaders(data, 128, task["seed"])
    return train, val, data.example_shape


def _model(task: dict, channels: int) -> nn.Module:
    torch.manual_seed(task["seed"])
    return CIFAR_MODELS[task["model"]](num_classes=10, in_channels=channels)


def _example(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


def run_task(task: dict) -> dict:
    """One (method, seed, target) run; fresh loaders each time so every method sees the same batch order."""
    torch.set_num_threads(task.get("threads", 1))
    warnings.filterwarnings("ignore")
    method, seed, target, epochs = task["method"], task["seed"], task["target"], task["epochs"]
    device = torch.device(task["device"])
    started = time.perf_counter()
    train, val, shape = _data(task)
    model = _model(task, shape[1])
    example = _example(shape, seed)

    def accuracy(m: nn.Module) -> float:
        return evaluate(m, val, device, nn.functional.cross_entropy)["accuracy"]

    result = {"method": method, "seed": seed, "pruned_flops_target": target}
    if method in ("dense", "half"):
        train_plain(model, train, epochs if method == "dense" else epochs // 2, device, seed)
        result.update(flops_kept=1.0, accuracy=accuracy(model))
        if method == "half":
            result["state"] = {k: v.cpu() for k, v in model.state_dict().items()}
    elif method in ("ato", "static"):
        ato = atofx.compile(model, example)
        share = 0.5 if task["data_dir"] is None else 0.05  # the digits recipe's D_CN; the paper's 5% on CIFAR
        ato.train(train, epochs, target_flops=1.0 - target, method=method, controller_data=share, seed=seed,
                  lam=task["lam"], device=device, progress=False)
        small = ato.prune()
        result.update(flops_kept=ato.flops(ato.mask) / ato.flops(), accuracy=accuracy(small))
    elif method in ("l1", "random"):
        model.load_state_dict(task["state"])
        ato = atofx.compile(model, example)
        if method == "l1":
            mask, kept = threshold_mask(ato, l1_scores(ato), 1.0 - target)
        else:
            mask, kept = uniform_mask(ato, 1.0 - target, seed)
        small = ato.prune(mask)
        train_plain(small, train, epochs - epochs // 2, device, seed, lr=task["finetune_lr"])
        result.update(flops_kept=kept, accuracy=accuracy(small))
    else:
        raise ValueError(f"unknown method {method!r}")
    result["seconds"] = time.perf_counter() - started
    print(f"  {method:6s} seed {seed} target {target:.2f}: {result['accuracy']:.2f}% at {result['flops_kept']:.3f} "
          f"of FLOPs ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return result


def _map(tasks: list[dict], jobs: int) -> list[dict]:
    if jobs <= 1:
        return [run_task(t) for t in tasks]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(run_task, tasks))


def run_all(seeds: list[int], targets: tuple[float, ...], epochs: int, finetune_lr: float = 0.01,
            jobs: int = 1, methods: tuple[str, ...] = METHODS, lam: float = PAPER_LAMBDA, data_dir: str | None = None,
            model: str = "resnet20", device: str = "cpu") -> list[dict]:
    """Every run: phase 1 dense, E/2 dense, ATO and static; phase 2 L1 and random from the E/2 dense models."""
    base = {"epochs": epochs, "finetune_lr": finetune_lr, "lam": lam, "data_dir": data_dir, "model": model,
            "device": device, "threads": 1 if data_dir is None else torch.get_num_threads()}
    finetuned = [m for m in ("l1", "random") if m in methods]
    first = [base | {"method": m, "seed": s, "target": 0.0} for s in seeds
             for m in ("dense", "half") if m in methods or (m == "half" and finetuned)]
    first += [base | {"method": m, "seed": s, "target": t} for t in targets for s in seeds
              for m in ("ato", "static") if m in methods]
    done = _map(first, jobs)
    half = {r["seed"]: r.pop("state") for r in done if r["method"] == "half"}
    second = [base | {"method": m, "seed": s, "target": t, "state": half[s]}
              for t in targets for s in seeds for m in finetuned]
    return [r for r in done if r["method"] != "half"] + _map(second, jobs)


def summarize(runs: list[dict], targets: tuple[float, ...]) -> list[dict]:
    """JSON rows: method, pruned_flops_target, flops_kept_mean, acc_mean, acc_std (dense once, target 0)."""
    rows = []
    for method in METHODS:
        for t in (0.0,) if method == "dense" else targets:
            sel = [r for r in runs if r["method"] == method and r["pruned_flops_target"] == t]
            if not sel:
                continue
            acc = [r["accuracy"] for r in sel]
            rows.append({"method": method, "pruned_flops_target": t,
                         "flops_kept_mean": statistics.mean(r["flops_kept"] for r in sel),
                         "acc_mean": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         "seeds": len(acc), "accuracies": acc})
    return rows


FLOPS_TOLERANCE = 0.01  # a method "meets" a target when its mean FLOPs kept is at most target kept + 1 point


def figures(rows: list[dict], targets: tuple[float, ...]) -> dict[str, bool]:
    """The issue's figures: ATO's mean >= every baseline's at each target; at 50% pruned ATO within 1 point of dense.

    An accuracy comparison only counts at equal FLOPs, so each target also reports whether ATO's mask met it
    (`ato_meets_flops_at_*`); `ato_best_at_*` is false when it did not.
    """
    get = {(r["method"], r["pruned_flops_target"]): r["acc_mean"] for r in rows}
    kept = {(r["method"], r["pruned_flops_target"]): r["flops_kept_mean"] for r in rows}
    out = {}
    for t in targets:
        if ("ato", t) not in get:
            continue
        others = [get[(m, t)] for m in ("static", "l1", "random") if (m, t) in get]
        met = kept[("ato", t)] <= 1.0 - t + FLOPS_TOLERANCE
        out[f"ato_meets_flops_at_{t:.2f}"] = met
        if others:  # no baseline run (--methods ato): nothing to be best against
            out[f"ato_best_at_{t:.2f}"] = met and get[("ato", t)] >= max(others)
    if 0.5 in targets and ("dense", 0.0) in get and ("ato", 0.5) in get:
        out["ato_within_1pt_of_dense_at_0.50"] = (out["ato_meets_flops_at_0.50"]
                                                  and get[("ato", 0.5)] >= get[("dense", 0.0)] - 1.0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 50%% pruned only; still 30 epochs: with fewer, ATO "
                        "misses its FLOPs target on digits (0.58 kept at 20 epochs)")
    parser.add_argument("--epochs", type=int, default=None, help="total epochs per method (default 30)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--targets", nargs="+", type=float, help="shares of FLOPs removed (default 0.3 0.5 0.7)")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="start of the fine-tuning cosine (L1, random)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="(default: all)")
    parser.add_argument("--lam", type=float, default=PAPER_LAMBDA, help="ATO's lambda (default: the paper's 10)")
    parser.add_argument("--data-dir", help="a folder holding CIFAR-10 (cifar-10-batches-py/): run on it, not digits")
    parser.add_argument("--model", choices=sorted(CIFAR_MODELS), default=None,
                        help="default: resnet20 on digits, resnet56 on CIFAR-10")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PNG", type=Path, help="also draw the results (see tools/bench_plots.py)")
    args = parser.parse_args(argv)

    if args.data_dir is None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)  # tiny models: one thread is faster than two on a shared 2-core machine
    model = args.model or ("resnet20" if args.data_dir is None else "resnet56")
    dataset = "digits" if args.data_dir is None else "CIFAR-10"
    epochs = args.epochs or 30
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    targets = tuple(args.targets or ((0.5,) if args.quick else TARGETS))
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs = run_all(seeds, targets, epochs, args.finetune_lr, args.jobs, tuple(args.methods), args.lam,
                   args.data_dir, model, args.device)
    rows = summarize(runs, targets)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    cells = [[r["method"], "-" if r["method"] == "dense" else f"{100 * r['pruned_flops_target']:.0f}%",
              f"{r['flops_kept_mean']:.3f}", f"{r['acc_mean']:.2f}", f"{r['acc_std']:.2f}", str(r["seeds"])]
             for r in sorted(rows, key=lambda r: (r["pruned_flops_target"], METHODS.index(r["method"])))]
    print(f"{model} on {dataset}, {epochs} epochs per method (L1/random: {epochs // 2} dense + "
          f"{epochs - epochs // 2} fine-tune), seeds {seeds}, ATO lambda {args.lam:g}")
    print(format_table(["method", "FLOPs pruned (target)", "FLOPs kept", "accuracy % (mean)", "std", "seeds"], cells))
    checks = figures(rows, targets)
    for name, ok in checks.items():
        print(f"{name}: {'holds' if ok else 'does NOT hold'}")
    print(f"{seconds:.0f} s, {args.jobs} job(s); torch {torch.__version__}, {os.cpu_count()} CPU cores; load average "
          f"(1/5/15 min) {'/'.join(f'{v:.1f}' for v in load_before)} before, "
          f"{'/'.join(f'{v:.1f}' for v in load_after)} after")
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "load_average_before": load_before,
               "load_average_after": load_after}
    payload = {"rows": rows, "runs": runs, "figures": checks, "epochs": epochs, "seeds": seeds,
               "model": model, "dataset": dataset, "lam": args.lam, "finetune_lr": args.finetune_lr,
               "seconds": seconds, "machine": machine, "date": datetime.date.today().isoformat()}
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {bench_plots.plot_accuracy(payload, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
