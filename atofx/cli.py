"""The `atofx` command line: one subcommand per job, each a `_add_<name>` + `_run_<name>` pair.

Errors atofx raises on purpose (AtofxError) print one line on stderr and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from atofx.errors import AtofxError

EXIT_ERROR = 2

Command = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------- inspect
def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="trace a model, print its channel spaces and draw its ZIGs",
        description="Trace MODEL with torch.fx, print one row per channel space (width, producers, consumers, "
        "share of FLOPs, pinned and why) and write the picture <model>-zigs.svg.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a torchvision classification model (resnet18, mobilenet_v2, ...) or package.module:factory")
    p.add_argument("--input-size", metavar="CxHxW", type=_input_size, default=None,
                   help="example input shape without the batch dim (default: 3x224x224, 3x299x299 for inception_v3)")
    p.add_argument("--out", metavar="DIR", type=Path, default=Path("."),
                   help="folder for the picture (default: the current folder)")
    p.add_argument("--prune-random", metavar="KEEP", type=float, default=None,
                   help="also prune a random mask keeping this share of every space and show FLOPs, params and "
                   "the equivalence check before and after")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask (default: 0)")
    p.set_defaults(run=_run_inspect)


def _input_size(text: str) -> tuple[int, ...]:
    from atofx.model_zoo import parse_input_size

    try:
        return parse_input_size(text)
    except AtofxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold back what is written to stderr; pass it on unless an AtofxError ends the block."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except AtofxError:
        raise
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    sys.stderr.write(held.getvalue())


def _file_stem(model: str) -> str:
    """A file-name-safe stem: `pkg.models:small_cnn` -> `pkg.models-small_cnn`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-.") or "model"


def _run_inspect(args: argparse.Namespace) -> int:
    import atofx
    from atofx.model_zoo import load

    zoo = load(args.model, args.input_size)
    with _held_stderr():  # torch's ShapeProp prints a traceback before atofx turns the failure into a ShapeError
        ato = atofx.compile(zoo.model, zoo.example)
    print(f"{args.model}: input {tuple(zoo.example.shape)}")
    print(ato.report())
    args.out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = ato.visualize(args.out / f"{_file_stem(args.model)}-zigs.svg")
    for w in caught:
        if issubclass(w.category, UserWarning) and "dot" in str(w.message):
            print(f"atofx: warning: {w.message}", file=sys.stderr)
    print(f"wrote {written}")
    if args.prune_random is not None:
        _prune_random(ato, zoo.example, args.prune_random, args.seed)
    return 0


def _prune_random(ato, example, keep: float, seed: int) -> None:
    """What atofx could remove: a random mask, pruned and checked against the masked model."""
    import atofx
    from atofx.passes.equivalence import relative_difference, run_eval
    from atofx.report import format_table

    mask = ato.random_mask(keep=keep, seed=seed)
    small = ato.prune(mask)  # raises EquivalenceError, naming the first layer, if the outputs differ
    reference = atofx.compile(copy.deepcopy(ato.model), example)
    reference.apply_mask(mask)
    diff = relative_difference(run_eval(reference.model, (example,)), run_eval(small, (example,)))
    flops = (atofx.count_flops(ato.model, example), atofx.count_flops(small, example))
    params = (atofx.count_params(ato.model), atofx.count_params(small))
    rows = [["FLOPs (M)", f"{flops[0] / 1e6:.1f}", f"{flops[1] / 1e6:.1f}", f"{flops[1] / flops[0]:.3f}"],
            ["params (k)", f"{params[0] / 1e3:.1f}", f"{params[1] / 1e3:.1f}", f"{params[1] / params[0]:.3f}"]]
    print(f"\nrandom mask keeping {keep:.2f} of every prunable space (seed {seed}):")
    print(format_table(["", "before", "after", "ratio"], rows))
    print(f"FLOPs model predicted {ato.flops(mask) / 1e6:.1f} M; pruned model type {type(small).__name__}")
    print(f"equivalence: masked vs pruned outputs differ by {diff:.2e} (relative max-abs; limit 1e-5): OK")


# ------------------------------------------------------------------------------------------ train
def _add_train(sub: argparse._SubParsersAction) -> None:
    from atofx.train_job import DATASETS, TrainJob

    d = TrainJob()
    p = sub.add_parser(
        "train",
        help="train once with ATO and write the pruned model (default: digits, no download)",
        description="Auto-Train-Once: train MODEL on DATASET with a controller that picks which channels to drop "
        "under a FLOPs budget, prune, and write OUT/: pruned.pt, summary.json, log.jsonl, zigs.svg. "
        "Rerunning the same command resumes from OUT/checkpoints.",
    )
    p.add_argument("--model", default=d.model, help=f"CIFAR ResNet (resnet20/32/56/110), a torchvision name or "
                   f"package.module:factory (default: {d.model})")
    p.add_argument("--dataset", default=d.dataset, choices=DATASETS, help=f"(default: {d.dataset})")
    p.add_argument("--data-dir", default=None, help="where the dataset lives (unused for digits)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"(default: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--target-flops", type=float, default=d.target_flops,
                   help=f"share of the dense FLOPs to keep, in (0, 1] (default: {d.target_flops})")
    p.add_argument("--method", choices=("ato", "static"), default=d.method,
                   help="ato: the controller; static: OTO-style fixed saliency mask (default: ato)")
    p.add_argument("--projection", choices=("prox", "hsp"), default=d.projection, help="(default: prox)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    p.add_argument("--out", default=d.out, help=f"output folder (default: ./{d.out})")
    p.add_argument("--no-dense-reference", action="store_true",
                   help="skip training the dense model that the accuracy change is measured against")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from atofx.train_job import TrainJob, run, summary_table

    job = TrainJob(model=args.model, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                   batch_size=args.batch_size, target_flops=args.target_flops, method=args.method,
                   projection=args.projection, device=args.device, seed=args.seed, out=args.out,
                   dense_reference=not args.no_dense_reference, progress=not args.quiet)
    summary = run(job)
    print(summary_table(summary))
    print(f"wrote {Path(args.out) / 'pruned.pt'} (load it with atofx.load), summary.json, log.jsonl, zigs.svg")
    return 0


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argparse tree; a new subcommand adds one `_add_<name>(sub)` call here."""
    from atofx import __version__

    parser = argparse.ArgumentParser(
        prog="atofx", description="Auto-Train-Once structural pruning as a torch.fx compiler pass."
    )
    parser.add_argument("--version", action="version", version=f"atofx {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", required=True)
    _add_inspect(sub)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `atofx` script and `python -m atofx`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except AtofxError as exc:
        message = " ".join(str(exc).split())
        print(f"atofx: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("atofx: interrupted", file=sys.stderr)
        return 130
