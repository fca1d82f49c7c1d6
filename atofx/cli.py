"""The `atofx` command line: one subcommand per job, each a `_add_<name>` + `_run_<name>` pair.

Errors atofx raises on purpose (AtofxError) print one line on stderr and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
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
    # Next subcommands: `train` (ATO on the bundled digits data -> ./atofx-out) and `report`
    # plug in here as _add_train(sub) / _add_report(sub), each setting `run=` with set_defaults.
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
