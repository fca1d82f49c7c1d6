"""User-style CNN sweep (issue 16): does every model of the user-style zoo (tools/user_cnns.py: U-Nets, FPN and
BiFPN necks, HRNet fusion, Res2Net, GhostNet, RepVGG, CBAM, non-local blocks, PixelShuffle, GroupNorm and
InstanceNorm, 1-D and 3-D convs, CRNNs, CSP, NetVLAD, ...) compile and prune exactly?

Each model is built with seeded weights, compiled on its seeded example inputs (in train mode, as a user starts
ATO), pruned with a seeded random mask that drops a third of every prunable space, and the pruned model checked
against the user's model masked in place (`ato.apply_mask`) on fresh inputs: in eval mode (max relative
difference 1e-5), and in train mode with every dropout draw kept (batch statistics, drop-path and dropout code
paths taken; a model whose masked form is random must stay random once pruned). A row records the outcome (`ok`,
or the error's class and first line: any exception, an EquivalenceError and a silent difference are failures), the
prunable and pinned spaces (with why), and the FLOPs `atofx.count_flops` counts before and after pruning.

    python tools/bench_user_cnns.py --json docs/results/bench-user-cnns.json
    python tools/bench_user_cnns.py --models unet cbam netvlad
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from atofx.passes.equivalence import relative_difference
from atofx.passes.values import evaluating
from bench_machine import machine_record
from bench_timm import failed_row
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from user_cnns import zoo
from user_cnns_entry import Entry

import atofx
from atofx.core.report import format_table

SEED, KEEP, TOL = 0, 2 / 3, 1e-5
aten = torch.ops.aten
_BERNOULLI = {aten.bernoulli.default, aten.bernoulli.p, aten.bernoulli_.float, aten.bernoulli_.Tensor}


class KeepEveryDraw(TorchDispatchMode):
    """Every dropout draw keeps its unit (bernoulli gives ones, native_dropout scales only): train mode made
    deterministic while taking its code paths, so a pruned and a masked model can be compared exactly. Dropout
    draws one number per channel, so with live draws the two would see different numbers."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _BERNOULLI:
            ones = torch.ones_like(args[0])
            return args[0].copy_(ones) if func.overloadpacket is aten.bernoulli_ else ones
        if func is aten.native_dropout.default:
            x, p = args[0], args[1]
            return x / (1 - p), torch.ones_like(x, dtype=torch.bool)
        return func(*args, **kwargs)


def _forward(model: nn.Module, inputs: tuple, seed: int) -> Any:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(*inputs)


def train_check(masked: nn.Module, small: nn.Module, inputs: tuple, seed: int) -> dict:
    """Train mode: equal outputs with every dropout draw kept, and randomness where the masked model has it."""
    for m in (masked, small):
        m.train()
    with KeepEveryDraw():
        diff = relative_difference(_forward(masked, inputs, seed), _forward(small, inputs, seed))
    random_masked, random_small = (relative_difference(_forward(m, inputs, seed), _forward(m, inputs, seed + 1)) > 0
                                   for m in (masked, small))
    for m in (masked, small):
        m.eval()
    return {"train_diff": diff, "stochastic": random_masked, "train_ok": diff <= TOL and random_small == random_masked}


BOUNDARY = ("model input", "model output")  # pinned in every model: the pin reasons the figure leaves out


def space_summary(ato: atofx.ATOModel) -> dict:
    """Prunable and pinned spaces, the pinned ones counted by reason (without the node it names)."""
    reasons = Counter(s.reason.split(" (at ")[0] for s in ato.spaces if s.pinned)
    return {"spaces": len(ato.spaces), "prunable": len(ato.zigs.prunable), "pinned": sum(reasons.values()),
            "pinned_reasons": dict(reasons.most_common())}


def sweep_model(entry: Entry, keep: float = KEEP, seed: int = SEED) -> dict:
    """Compile, mask and prune one zoo model and check the pruned model; the row says what happened."""
    torch.manual_seed(seed)
    model = entry.make()
    inputs = entry.inputs(seed)
    row: dict = {"model": entry.name, "pattern": entry.pattern, "inputs": [list(s) for s in entry.shapes]}
    start = time.perf_counter()
    try:
        ato = atofx.compile(model, inputs)
        row.update(space_summary(ato), flops_dense=atofx.count_flops(model, inputs))
        if ato.zigs.prunable:
            row.update(prune_and_compare(ato, entry.inputs(seed + 1), keep, seed))
        else:
            row.update(status="ok", flops_pruned=row["flops_dense"], flops_removed=0.0)
    except Exception as exc:
        row.update(failed_row(exc))
    row["seconds"] = time.perf_counter() - start
    return row


def prune_and_compare(ato: atofx.ATOModel, fresh: tuple, keep: float, seed: int) -> dict:
    """Prune with a random mask keeping `keep` of every space, then compare with the user's model masked in place
    on `fresh` inputs, in eval and in train mode; FLOPs counted on the example inputs."""
    mask = ato.random_mask(keep=keep, seed=seed)
    small = ato.prune(mask)  # raises EquivalenceError when the pruned model differs on the example inputs
    ato.apply_mask(mask)  # the user's model, masked in place: the reference from here on
    model = ato.model
    out = {"flops_pruned": atofx.count_flops(small, ato.example_inputs)}
    out["flops_removed"] = 1 - out["flops_pruned"] / atofx.count_flops(model, ato.example_inputs)
    with evaluating(model), evaluating(small):
        out["eval_diff"] = relative_difference(model(*fresh), small(*fresh))
    out.update(train_check(model, small, fresh, seed))
    exact = out["eval_diff"] <= TOL and out["train_ok"]
    out["status"] = "ok" if exact else "silent difference"
    if not exact:
        out["error"] = f"eval diff {out['eval_diff']:.3g}, train diff {out['train_diff']:.3g}"
    return out


def _cells(row: dict) -> list[str]:
    removed = f"{row['flops_removed']:.1%}" if "flops_removed" in row else "-"
    spaces = f"{row['prunable']}/{row['spaces']}" if "spaces" in row else "-"
    pinned = "; ".join(f"{n} {why}" for why, n in row.get("pinned_reasons", {}).items() if why not in BOUNDARY) or "-"
    train = "-" if "train_ok" not in row else ("exact" if row["train_ok"] else "differs") + (
        " (random)" if row["stochastic"] else "")
    return [row["model"], row["status"], spaces, removed, train, pinned[:90], row.get("error", "")[:80]]


def summary(rows: list[dict]) -> dict:
    """The sweep's figure: models, exact ones, the models with spaces pinned inside them (not at an input or output)
    and why, and the FLOPs removed by the median, least and most pruned."""
    removed = sorted(r["flops_removed"] for r in rows if r["status"] == "ok" and r.get("prunable"))
    inside = {r["model"]: [why for why in r["pinned_reasons"] if why not in BOUNDARY]
              for r in rows if "pinned_reasons" in r}
    return {"models": len(rows), "exact": sum(r["status"] == "ok" for r in rows),
            "pinned_inside": {model: reasons for model, reasons in inside.items() if reasons},
            "flops_removed_median": removed[len(removed) // 2] if removed else None,
            "flops_removed_min": removed[0] if removed else None, "flops_removed_max": removed[-1] if removed else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models = zoo()
    parser.add_argument("--models", nargs="+", metavar="NAME", choices=sorted(models),
                        help="zoo model names (default: all of them)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"weights, inputs and mask seed (default {SEED})")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows, wall, cpu = [], time.perf_counter(), time.process_time()
    for name in args.models or list(models):
        rows.append(sweep_model(models[name], seed=args.seed))
        print(f"  {name}: {rows[-1]['status']} {rows[-1].get('error', '')[:120]}", file=sys.stderr, flush=True)
    figure = summary(rows) | {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    print(format_table(["model", "status", "prunable/spaces", "FLOPs removed", "train mode", "pinned inside", "error"],
                       [_cells(r) for r in rows]))
    print(f"{figure['exact']} of {figure['models']} user-style CNNs compile and prune exactly in eval and train mode "
          f"(random mask keeping {KEEP:.0%} of every space, seed {args.seed}; torch {torch.__version__})")
    if args.json:
        machine = machine_record()
        command = "python tools/bench_user_cnns.py " + " ".join(sys.argv[1:] if argv is None else argv)
        payload = figure | {"rows": rows, "machine": machine, "date": datetime.date.today().isoformat(),
                            "command": command.strip(), "keep": KEEP, "seed": args.seed}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0 if figure["exact"] == figure["models"] else 1


if __name__ == "__main__":
    sys.exit(main())
