"""`atofx train` on the command line: its flags (defaults from TrainJob and ATOConfig) and the command.

Imports no torch until the command runs: `atofx train --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atofx.app.options import CIFAR_MODEL_NAMES, DATASETS, OPTIMIZERS, TrainJob, load_recipe
from atofx.ato.config import CHOICES, FLAVOURS, METHODS, MIN_EPOCHS, OFFICIAL, PROJECTIONS, ATOConfig

TRAIN_HELP = "train once with ATO and write the pruned model (default: digits, no download)"
# what a command-line user can do about a short schedule (atofx.errors.ScheduleWarning; Python's wording is in
# atofx.ato.model)
SCHEDULE_ADVICE = (f"Train for more epochs (at least {MIN_EPOCHS}: --epochs), give the controller more data or passes "
                   "(--controller-data, --controller-epochs), or use --method static.")

# command-line dest -> TrainJob field, for the flags whose name differs from the field
_FLAG_FIELDS = {"no_dense_reference": "dense_reference", "quiet": "progress", "no_picture": "picture"}


def add_train(sub: argparse._SubParsersAction) -> None:
    """`atofx train`'s flags; every default shown is the one TrainJob or ATOConfig defines."""
    d, c = TrainJob(), ATOConfig()
    p = sub.add_parser(
        "train",
        help=TRAIN_HELP,
        description="Auto-Train-Once: train MODEL on DATASET with a controller that picks which channels to drop "
        "under a FLOPs budget, prune, and write OUT/: pruned.pt, summary.json, log.jsonl, zigs.svg, "
        "accuracy_flops.png, widths.png. Rerunning the same command resumes from OUT/checkpoints.",
        argument_default=argparse.SUPPRESS,  # only the flags given land in args: they override --config
    )
    p.add_argument("--config", metavar="FILE", help="a recipe file (.yaml/.json) whose keys are train options "
                   "(model, dataset, epochs, batch_size, lr, target_flops, ...); flags given here override it. "
                   "See recipes/")
    p.add_argument("--model", help=f"a CIFAR model ({', '.join(CIFAR_MODEL_NAMES)}), a torchvision name or "
                   f"package.module:factory (default: {d.model})")
    p.add_argument("--dataset", choices=DATASETS, help=f"(default: {d.dataset})")
    p.add_argument("--data-dir", metavar="DIR", help="where the dataset lives (unused for digits; fashion-mnist: "
                   "default /usr/share/datasets/fashion-mnist, from `apt-get install dataset-fashion-mnist`); folder "
                   "and imagenet: DIR/train and DIR/val hold one subfolder per class")
    p.add_argument("--download", action="store_true", help="cifar10/cifar100: download into --data-dir first")
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="data loading processes (default: min(4, CPU count); digits loads in-process)")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="folder/imagenet resolution (default: 32 for the CIFAR models, 224 otherwise)")
    p.add_argument("--epochs", type=int, help=f"(default: {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"the global batch; under torchrun each of W ranks loads "
                   f"batch-size / W (default: {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"learning rate for the global batch (not scaled with the ranks), "
                   f"cosine schedule (default: {d.lr})")
    p.add_argument("--target-flops", type=float,
                   help=f"share of the dense FLOPs to keep, in (0, 1] (default: {d.target_flops})")
    p.add_argument("--method", choices=METHODS,
                   help=f"ato: the controller; static: OTO-style fixed saliency mask (default: {c.method})")
    p.add_argument("--projection", choices=PROJECTIONS, help=f"(default: {c.projection})")
    p.add_argument("--round-to", type=int, metavar="N",
                   help="keep a multiple of N channels per space (8 or 16 run faster on most CPUs and GPUs; "
                   f"default: {c.round_to})")
    p.add_argument("--device", help=f"cpu, cuda, cuda:N or auto (default: {d.device})")
    p.add_argument("--seed", type=int, help=f"(default: {d.seed})")
    p.add_argument("--out", help=f"output folder (default: ./{d.out})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on digits, torch's choice otherwise)")
    p.add_argument("--no-dense-reference", action="store_true",
                   help="skip training the dense model that the accuracy change is measured against")
    p.add_argument("--amp", choices=("bf16", "fp16"),
                   help="mixed precision: bf16 autocast, or fp16 with a grad scaler (for GPUs; default: off)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on recent GPUs)")
    p.add_argument("--quiet", action="store_true", help="print only warnings, errors and the final table (no progress bars, "
                   "per-epoch lines or resume notes)")
    _add_recipe_flags(p)
    _add_ato_flags(p, c)
    p.add_argument("--no-picture", action="store_true", help="do not draw OUT/zigs.svg")
    p.set_defaults(run=run_train)


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """The training recipe's flags: optimiser, weight decay, warm-up, label smoothing, mixup."""
    g = p.add_argument_group("training recipe (the authors' ImageNet runs: --optimizer adamw --lr 1e-3 "
                             "--warmup-epochs 5 --label-smoothing 0.1 --mixup 0.2)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (momentum 0.9, nesterov) or adamw (default: sgd)")
    g.add_argument("--weight-decay", type=float, help="(default: 5e-4 with sgd, 0.05 with adamw)")
    g.add_argument("--warmup-epochs", type=int, metavar="N", help="linear lr warm-up epochs before the cosine (default: 0)")
    g.add_argument("--label-smoothing", type=float, help="of the target model's loss (default: 0)")
    g.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup of the training batches, Beta(ALPHA, ALPHA) "
                   "(default: 0, off)")


def _add_ato_flags(p: argparse.ArgumentParser, c: ATOConfig) -> None:
    """ATO's options, each with the default `c` has and the official flavour's value."""
    a = p.add_argument_group("ATO's options (docs/design-notes.md; default: atofx's choice of each, or the "
                             "flavour's)")
    a.add_argument("--flavour", choices=FLAVOURS, help="official: every choice of the authors' released code "
                   f"(ATOConfig.official()); the flags below override it (default: {FLAVOURS[0]})")
    a.add_argument("--controller-data", type=float, metavar="SHARE",
                   help="share of the training set the controller learns from, D_CN (default: 0.5 on digits, about "
                   f"1000 images of a small folder, else {c.controller_data}, the paper's)")
    a.add_argument("--controller-epochs", type=int, metavar="N", help="passes over D_CN per window epoch (default: "
                   f"as many as give the controller {c.controller_steps} steps over its window, at most one a "
                   "training step; one pass at paper scale)")
    for name, values in CHOICES.items():
        a.add_argument(f"--{name.replace('_', '-')}", choices=values,
                       help=f"(default: {getattr(c, name)}; official {OFFICIAL.get(name, getattr(c, name))})")
    a.add_argument("--lam-boost", type=float, help=f"lambda multiplier after the freeze (default: {c.lam_boost}; "
                   f"official {OFFICIAL['lam_boost']})")
    a.add_argument("--lam-jump-at", type=float, metavar="SHARE",
                   help=f"lam-schedule jump: the share of epochs where lambda jumps (default: {c.lam_jump_at})")
    a.add_argument("--hsp-eps", type=float, help=f"projection hsp: OTO's epsilon (default: {c.hsp_eps})")
    a.add_argument("--head-bias", type=_on_off, metavar="on|off", help="controller heads with a bias (default: "
                   f"{'on' if c.head_bias else 'off'})")


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def train_job_from_args(args: argparse.Namespace) -> TrainJob:
    """TrainJob defaults, then the --config file, then the flags the user gave."""
    values = load_recipe(args.config) if getattr(args, "config", None) else {}
    for dest, value in vars(args).items():
        if dest in ("config", "run", "command"):
            continue
        if dest in _FLAG_FIELDS:
            values[_FLAG_FIELDS[dest]] = not value
        else:
            values[dest] = value
    return TrainJob(**values)


def run_train(args: argparse.Namespace) -> int:
    from atofx.app.run_summary import summary_table
    from atofx.app.train_job import run
    from atofx.ato import distributed

    job = train_job_from_args(args)
    try:
        summary = run(job)
    except KeyboardInterrupt:
        if distributed.launch_rank_zero():  # once, not once per torchrun rank
            print(interrupted_message(job), file=sys.stderr)
        return 130
    finally:
        distributed.stop()
    if distributed.launch_rank_zero():  # under torchrun, rank 0 speaks for all
        print(summary_table(summary))
        files = ["summary.json", "log.jsonl", *([summary["picture"]] if summary.get("picture") else []),
                 "accuracy_flops.png", "widths.png"]
        print(f"wrote {Path(job.out) / 'pruned.pt'} (load it with atofx.load), {', '.join(files)}")
    return 0


def interrupted_message(job: TrainJob) -> str:
    """What Ctrl-C leaves for a rerun: the checkpoints, and the dense reference only once OUT/dense.json holds this
    job's (an interrupt during the dense epochs has none to keep)."""
    from atofx.app.run_folder import dense_reference

    out = Path(job.out)
    kept = job.dense_reference and dense_reference(job, out, progress=False) is not None
    dense = f"; the finished dense reference is kept in {out / 'dense.json'}" if kept else ""
    return (f"atofx: interrupted. Rerun the same command to resume from the last finished epoch (checkpoints in "
            f"{out / 'checkpoints'}{dense}).")
