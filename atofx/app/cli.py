"""The `atofx` command line: one subcommand per job, each a `_add_<name>` + `_run_<name>` pair.

Errors atofx raises on purpose (AtofxError) print one line on stderr and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import io
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from atofx.app.train_command import SCHEDULE_ADVICE, TRAIN_HELP, add_train
from atofx.errors import AtofxError, AtofxWarning, ConfigError, ScheduleWarning, ShapeError, TraceError

EXIT_ERROR = 2

Command = Callable[[argparse.Namespace], int]
# one line per subcommand for `atofx --help`, which builds no subcommand's arguments (they import torch)
HELP = {
    "inspect": "trace a model, print its channel spaces and draw its ZIGs",
    "train": TRAIN_HELP,
    "report": "print a finished run's summary table and redraw its plots",
    "recipes": "list the recipes (the paper's rows) with their targets and the paper's figures",
    "export": "write a saved (pruned) model as ONNX, checked against PyTorch",
}


# ---------------------------------------------------------------------------------------- inspect
def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help=HELP["inspect"],
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
    p.add_argument("--view", choices=("auto", "layers", "spaces"), default="auto",
                   help="picture: one box per layer, or per channel space with edges through the layers that join "
                   "them (default auto: spaces above 250 layers, where dot would take minutes)")
    p.add_argument("--no-picture", action="store_true", help="print the report only, draw nothing")
    p.set_defaults(run=_run_inspect)


def _input_size(text: str) -> tuple[int, ...]:
    from atofx.app.model_zoo import parse_input_size

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
    from atofx.app.model_zoo import load, misfit, untraceable
    from atofx.ato.model import compile
    from atofx.core.files import make_folder

    if args.prune_random is not None and not 0.0 < args.prune_random <= 1.0:
        raise ConfigError(f"--prune-random is the share of every space kept, in (0, 1], got {args.prune_random}.")
    if not args.no_picture:  # before the trace, which can take a while
        make_folder(args.out, "give another --out, or --no-picture")
    zoo = load(args.model, args.input_size)
    try:
        with _held_stderr():  # whatever a failing model prints stays hidden behind atofx's one-line error
            ato = compile(zoo.model, zoo.example)
    except TraceError as exc:
        raise untraceable(exc, f"MODEL {args.model}") from exc
    except ShapeError as exc:
        given = "x".join(map(str, args.input_size)) if args.input_size else "the default"
        raise misfit(exc, f"With --input-size {given}, the model got a batch of shape {tuple(zoo.example.shape)}: "
                          "give --input-size as one sample's shape without the batch dim, CxHxW for images (like "
                          "3x64x64).") from exc
    print(f"{args.model}: input {tuple(zoo.example.shape)}")
    print(ato.report())
    if not args.no_picture:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = ato.visualize(args.out / f"{_file_stem(args.model)}-zigs.svg", view=args.view)
        for w in caught:
            if issubclass(w.category, UserWarning) and "dot" in str(w.message):
                print(f"atofx: warning: {w.message}", file=sys.stderr)
        print(f"wrote {written}")
    if args.prune_random is not None:
        _prune_random(ato, zoo.example, args.prune_random, args.seed)
    return 0


def _prune_random(ato, example, keep: float, seed: int) -> None:
    """What atofx could remove: a random mask, pruned and checked against the masked model."""
    from atofx.core.counting import count_flops, count_params
    from atofx.core.pruning import zero_dropped
    from atofx.core.report import format_table
    from atofx.passes.equivalence import relative_difference, run_eval

    mask = ato.random_mask(keep=keep, seed=seed)
    small = ato.prune(mask)  # raises EquivalenceError, naming the first layer, if the outputs differ
    reference = copy.deepcopy(ato.model)  # the masked model, without analysing the copy again
    zero_dropped(reference, ato.zigs, mask.component_keep(ato.zigs))
    diff = relative_difference(run_eval(reference, (example,)), run_eval(small, (example,)))
    flops = (count_flops(ato.model, example), count_flops(small, example))
    params = (count_params(ato.model), count_params(small))
    rows = [["FLOPs (M)", f"{flops[0] / 1e6:.1f}", f"{flops[1] / 1e6:.1f}", f"{flops[1] / flops[0]:.3f}"],
            ["MACs (M) = FLOPs / 2", f"{flops[0] / 2e6:.1f}", f"{flops[1] / 2e6:.1f}", f"{flops[1] / flops[0]:.3f}"],
            ["params (k)", f"{params[0] / 1e3:.1f}", f"{params[1] / 1e3:.1f}", f"{params[1] / params[0]:.3f}"]]
    print(f"\nrandom mask keeping {keep:.2f} of every prunable space (seed {seed}):")
    print(format_table(["", "before", "after", "ratio"], rows))
    print(f"FLOPs model predicted {ato.flops(mask) / 1e6:.1f} M; pruned model type {type(small).__name__}")
    print(f"equivalence: masked vs pruned outputs differ by {diff:.2e} (relative max-abs; limit 1e-5): OK")


# ----------------------------------------------------------------------------------------- report
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help=HELP["report"],
        description="Read RUN_DIR/summary.json, log.jsonl and widths.json (written by `atofx train`), print the "
        "summary table and redraw RUN_DIR/accuracy_flops.png and RUN_DIR/widths.png.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the --out folder of an `atofx train` run")
    p.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from atofx.app.plots import draw_run_plots
    from atofx.app.run_summary import read_run, summary_table

    run_dir, summary = read_run(args.run_dir)  # names a missing or damaged file, and what to do, before drawing
    written = draw_run_plots(run_dir)
    print(summary_table(summary))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# ---------------------------------------------------------------------------------------- recipes
def _add_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recipes",
        help=HELP["recipes"],
        description="One row per file in recipes/: model, dataset, FLOPs pruned and kept (the paper's row), the "
        "paper's dense and ATO top-1 where we could source them, epochs, global batch, optimiser. Run one with "
        "`atofx train --config recipes/<recipe>.yaml`.",
    )
    p.set_defaults(run=_run_recipes)


def _run_recipes(args: argparse.Namespace) -> int:
    from atofx.app.options import RECIPES, recipes_table

    print(recipes_table())
    print(f"(files in {RECIPES}; run one with: atofx train --config <recipe> --data-dir DIR)")
    return 0


# ----------------------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help=HELP["export"],
        description="Load MODEL_FILE (written by atofx.save or `atofx train`, like OUT/pruned.pt) and write it as "
        "ONNX with a dynamic batch dim; the ONNX file's outputs are checked against PyTorch's. Needs the onnx and "
        "onnxscript packages.",
    )
    p.add_argument("model_file", metavar="MODEL_FILE", type=Path, help="a file written by atofx.save")
    p.add_argument("onnx_file", metavar="ONNX_FILE", type=Path, help="where to write the .onnx file")
    p.add_argument("--input-size", metavar="CxHxW", type=_input_size, default=None,
                   help="one input's shape without the batch dim (default: the shape the file was saved with)")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import torch

    from atofx.core.export import export_onnx

    model, saved = _load_for_export(args.model_file)
    _check_onnx_file(args.onnx_file)
    shapes = [[2, *args.input_size]] if args.input_size is not None else saved
    if not shapes:
        raise AtofxError(f"{args.model_file} does not record its input shape: give --input-size CxHxW.")
    generator = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(max(2, s[0]), *s[1:], generator=generator) for s in shapes)
    try:
        diff = export_onnx(model, args.onnx_file, example)
    except ShapeError as exc:
        raise _export_misfit(exc, args, saved) from exc
    print(f"wrote {args.onnx_file} (input {'x'.join(map(str, ['N', *shapes[0][1:]]))}; outputs match PyTorch "
          f"within {diff:.1e})")
    return 0


def _load_for_export(path: Path) -> tuple[Any, list | None]:
    """The model in MODEL_FILE and the input shapes it was saved with; a missing file or a folder is an AtofxError
    (atofx.load raises the OSError itself, for Python callers)."""
    from atofx.core.serialization import load, read_payload

    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        hint = f" ({', '.join(str(path / name) for name in inside)})" if inside else " (like OUT/pruned.pt)"
        raise AtofxError(f"MODEL_FILE {path} is a folder: give the model file in it{hint}.")
    if not path.exists():
        raise AtofxError(f"MODEL_FILE {path} does not exist: give a file written by atofx.save or `atofx train` "
                         "(like OUT/pruned.pt).")
    try:
        return load(path), read_payload(path).get("example_shapes")
    except OSError as exc:  # unreadable: permissions, a device, ...
        raise AtofxError(f"MODEL_FILE {path} cannot be read: {exc.strerror or exc}.") from exc


def _check_onnx_file(path: Path) -> None:
    """Refuse a folder as ONNX_FILE (the exporter's own error would be a bare IsADirectoryError)."""
    if path.is_dir():
        raise AtofxError(f"ONNX_FILE {path} is a folder: give the file to write, like {path / 'model.onnx'}.")


def _export_misfit(exc: ShapeError, args: argparse.Namespace, saved: list | None) -> AtofxError:
    """The example input does not fit the model: what was given, the model's error, what --input-size looks like."""
    from atofx.core.export import first_line

    why = (first_line(exc.__cause__) if exc.__cause__ is not None else str(exc)).rstrip(".")
    given = f"--input-size {'x'.join(map(str, args.input_size))}" if args.input_size else "the saved input shape"
    fits = f" (the file was saved with {'x'.join(map(str, saved[0][1:]))})" if saved and args.input_size else ""
    return ShapeError(f"{given} does not fit the model in {args.model_file}: {why}. Give --input-size as one "
                      f"input's shape without the batch dim, CxHxW for images{fits}.")


# ------------------------------------------------------------------------------------------- parser
ADDERS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "inspect": _add_inspect, "train": add_train, "report": _add_report, "recipes": _add_recipes,
    "export": _add_export}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argparse tree; a new subcommand adds a HELP line and an `_add_<name>` function to ADDERS.

    `only`: build that subcommand's arguments alone, the others as their help line (main passes the command
    typed, so `atofx --help` and `atofx inspect ...` never import what the other subcommands need).
    """
    from atofx.version import __version__

    parser = argparse.ArgumentParser(
        prog="atofx", description="Auto-Train-Once structural pruning as a torch.fx compiler pass."
    )
    parser.add_argument("--version", action="version", version=f"atofx {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", required=True)
    for name, add in ADDERS.items():
        if only is None or only == name:
            add(sub)
        else:
            sub.add_parser(name, help=HELP[name])
    return parser


def _command(argv: Sequence[str]) -> str:
    """The subcommand typed ("" when none is): the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """atofx's own warnings as one `atofx: warning:` line, by the main process only (torchrun's ranks would each say
    it); others as Python prints them."""
    from atofx.ato.distributed import launch_rank_zero  # torch: not loaded for --help

    if issubclass(category, AtofxWarning) and not launch_rank_zero():
        return
    if isinstance(message, ScheduleWarning):  # its advice, in flags
        print(f"atofx: warning: {message.diagnosis} {SCHEDULE_ADVICE}", file=sys.stderr)
    elif issubclass(category, AtofxWarning):
        print(f"atofx: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _refuse_unknown(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """Exit as argparse does on unrecognized arguments, with the subcommand's usage and the nearest flag."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subparsers.choices[command]
    flags = [f for action in sub._actions for f in action.option_strings if f.startswith("--")]
    near = {u: difflib.get_close_matches(u.split("=", 1)[0], flags, n=1, cutoff=0.75) for u in unknown
            if u.startswith("--")}
    hints = [f"{u.split('=', 1)[0]}: did you mean {m[0]}?" for u, m in near.items() if m]
    sub.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `atofx` script and `python -m atofx`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(parser, args.command, unknown)
    run: Command = args.run
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return run(args)
    except AtofxError as exc:
        message = " ".join(str(exc).split())
        print(f"atofx: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("atofx: interrupted", file=sys.stderr)
        return 130
