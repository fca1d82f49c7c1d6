"""Zoo sweep: does every timm CNN compile and prune exactly? A fixed-seed sample of timm's CNNs at a small input.

Each model (the sample: at most 60M parameters, so that the sweep fits a laptop) is built without pretrained
weights (seeded), compiled on one small batch (64x64; 128x128 for a model whose stem needs more, like
Inception's), pruned with a seeded random mask that drops a third of every prunable space, and the pruned
model checked against the masked one (`ATOModel.prune`'s equivalence check, max relative difference 1e-5).
A row records the outcome (`ok`, or the error's class and first line), the channel spaces, and the FLOPs
the mask removes.
Transformers and other attention-first families are left out. Needs timm (`pip install -e .[dev]`).

One torch thread by default: the inputs are tiny, and two OpenMP threads on a machine whose other core is
busy made a forward pass of regnetx_016 take ~17 s instead of 0.04 (threads waiting on each other at every
op), so the 69-model sweep, once ~3 minutes a model, takes 109 s of CPU in all (2026-11-30, 2-core VM).

    python tools/bench_timm.py --json timm-sweep.json            # 60 sampled CNNs + the named ones
    python tools/bench_timm.py --all --json timm-all.json        # every CNN that builds at the input size
    python tools/bench_timm.py --models resnetblur50d tf_efficientnet_b0
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import sys
import time
import warnings
from pathlib import Path

import torch
from bench_machine import machine_record

import atofx
from atofx.core.report import format_table

# always in the sweep: the blur pools (a functional depthwise conv) and TensorFlow-ported 'SAME' padding
REQUIRED = ["resnetblur50d", "densenetblur121d", "tf_efficientnet_b0", "tf_efficientnet_b1", "tf_efficientnet_lite0",
            "tf_efficientnet_es", "tf_efficientnet_cc_b0_4e", "tf_efficientnetv2_b0", "tf_mixnet_s"]
# name fragments of transformer and attention-first families (not CNNs in the sense of this sweep)
NOT_CNN = ("vit", "deit", "swin", "beit", "cait", "xcit", "levit", "coat", "crossvit", "convit", "pit_", "tnt",
           "twins", "mvit", "efficientformer", "maxvit", "maxxvit", "eva", "mobilevit", "poolformer", "sequencer",
           "volo", "gcvit", "davit", "nest_", "hiera", "sam", "fastvit", "tiny_vit", "next_vit", "edgenext",
           "mixer", "resmlp", "gmlp", "gmixer", "convmixer", "visformer", "hgnet", "metaformer", "caformer",
           "convformer", "flexivit", "inception_next", "rdnet", "repvit", "focalnet", "pvt", "efficientvit",
           "mambaout", "starnet", "aimv2", "naflex", "lambda", "halo", "botnet", "sebotnet", "haloregnet",
           "lamhalobotnet", "shvit", "swiftformer", "vovnet", "test_", "csatv2", "nfnet_l", "fasternet",
           "mobilenetv5", "vgg", "former", "vim", "_clip", "mambaout")
SAMPLE, SEED, SIZE, KEEP, MAX_PARAMS = 60, 0, 64, 2 / 3, 60e6


def cnn_names() -> list[str]:
    """Every timm model name that is not in a transformer or attention-first family."""
    import timm

    return [n for n in timm.list_models() if not any(part in n for part in NOT_CNN)]


def parameter_count(name: str) -> int | None:
    """Parameters of a timm model, built on the meta device (no memory, no time); None if it does not build."""
    import timm

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=10).parameters())
    except Exception:  # a name that needs arguments: the sweep reports it when it tries to build it
        return None


def sample(names: list[str], count: int, seed: int, max_params: float) -> list[str]:
    """The required models, then a fixed-seed sample of the rest with at most `max_params` parameters."""
    rest = sorted(set(names) - set(REQUIRED))
    random.Random(seed).shuffle(rest)
    picked: list[str] = []
    for name in rest:
        if len(picked) == count:
            break
        n = parameter_count(name)
        if n is not None and n <= max_params:
            picked.append(name)
    return [n for n in REQUIRED if n in names] + picked


def sweep_model(name: str, size: int, keep: float = KEEP, seed: int = SEED) -> dict:
    """Compile, mask and prune one timm model; the row says what happened."""
    import timm

    torch.manual_seed(seed)
    row: dict = {"model": name, "input": [2, 3, size, size]}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    except Exception as exc:  # some names need arguments: not a result about atofx
        return row | {"status": "does not build", "error": _first_line(exc)}
    for side in (size, 2 * size):  # Inception's stems need at least 75x75
        x = torch.randn(2, 3, side, side)
        try:
            with torch.no_grad():
                model(x)
            break
        except Exception as exc:
            failure = _first_line(exc)
    else:
        return row | {"status": "does not run at this input", "error": failure}
    row["input"] = list(x.shape)
    start = time.perf_counter()
    try:
        ato = atofx.compile(model, x)
        row["compile_s"] = time.perf_counter() - start
        row.update(spaces=len(ato.spaces), prunable=len(ato.zigs.prunable),
                   unknown_ops=sorted(set(ato.zigs.facts.unknown_ops.values()))[:5])
        if not ato.zigs.prunable:
            return row | {"status": "ok", "flops_removed": 0.0}
        mask = ato.random_mask(keep=keep, seed=seed)
        dense, masked = ato.flops(), ato.flops(mask)
        small = ato.prune(mask)  # raises EquivalenceError when the pruned model differs
        row.update(status="ok", flops_removed=1 - masked / dense, pruned_class=type(small).__name__)
    except Exception as exc:
        row.update(failed_row(exc))
    return row


def failed_row(exc: BaseException) -> dict:
    """A failed sweep row's status and error: the AtofxError's class, or `raw <class>` for any other exception
    (an atofx bug), and the error's first line."""
    status = type(exc).__name__ if isinstance(exc, atofx.AtofxError) else f"raw {type(exc).__name__}"
    return {"status": status, "error": _first_line(exc)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _cells(row: dict) -> list[str]:
    removed = f"{row['flops_removed']:.1%}" if "flops_removed" in row else "-"
    spaces = f"{row['prunable']}/{row['spaces']}" if "spaces" in row else "-"
    return [row["model"], row["status"], spaces, removed, row.get("error", "")[:80]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", metavar="NAME", help="timm model names (default: the sample)")
    parser.add_argument("--all", action="store_true", help="every timm CNN, not a sample")
    parser.add_argument("--count", type=int, default=SAMPLE, help=f"sampled models besides the required ones "
                                                                 f"(default {SAMPLE})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"sample, weights and mask seed (default {SEED})")
    parser.add_argument("--size", type=int, default=SIZE, help=f"input height and width (default {SIZE})")
    parser.add_argument("--max-params", type=float, default=MAX_PARAMS,
                        help=f"sample only models with at most this many parameters (default {MAX_PARAMS:.0e})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the docstring)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    names = args.models or (cnn_names() if args.all else sample(cnn_names(), args.count, args.seed, args.max_params))
    rows = []
    for name in names:
        row = sweep_model(name, args.size, seed=args.seed)
        rows.append(row)
        print(f"  {name}: {row['status']} {row.get('error', '')[:120]}", file=sys.stderr, flush=True)
        gc.collect()
    built = [r for r in rows if r["status"] not in ("does not build", "does not run at this input")]
    exact = [r for r in built if r["status"] == "ok"]
    print(format_table(["model", "status", "prunable/spaces", "FLOPs removed", "error"], [_cells(r) for r in rows]))
    print(f"{len(exact)} of {len(built)} timm CNNs that build and run at {args.size}x{args.size} (or twice that) "
          f"compile and prune exactly "
          f"(random mask keeping {KEEP:.0%} of every space, seed {args.seed}; torch {torch.__version__})")
    if args.json:
        machine = machine_record()
        payload = {"exact": len(exact), "built": len(built), "rows": rows, "machine": machine,
                   "date": datetime.date.today().isoformat(), "size": args.size, "seed": args.seed}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0 if len(exact) == len(built) else 1


if __name__ == "__main__":
    sys.exit(main())
