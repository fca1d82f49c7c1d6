"""A finished `atofx train` run: the table it prints, and the files of its --out folder that `atofx report` reads,
each checked first, so that a damaged one is named in one line with what to do."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from atofx.core.report import format_table
from atofx.errors import AtofxError


def summary_table(s: dict[str, Any]) -> str:
    """The table `atofx train` prints at its end and `atofx report` prints again, from summary.json's keys."""
    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}%"

    def ops(flops: float) -> list[str]:  # FLOPs = 2 x MACs; Torch-Pruning and many papers report MACs
        return [f"{flops / 1e6:.2f}", f"{flops / 2e6:.2f}"]

    rows = [
        ["dense", acc(s["accuracy_dense"]), *ops(s["flops_before"]), f"{s['params_before'] / 1e3:.1f}", "1.000"],
        ["ATO trained", acc(s["accuracy_trained"]), *ops(s["flops_before"]), f"{s['params_before'] / 1e3:.1f}",
         "1.000"],
        ["ATO pruned", acc(s["accuracy_pruned"]), *ops(s["flops_after"]), f"{s['params_after'] / 1e3:.1f}",
         f"{s['flops_kept']:.3f}"],
    ]
    table = format_table(["model", "accuracy", "MFLOPs", "MMACs", "kparams", "FLOPs kept"], rows)
    now = s.get("seconds_this_invocation", s["seconds"])
    took = f"{s['seconds']:.0f} s" + (f" in all, {now:.0f} s this time" if s["seconds"] - now >= 1 else "")
    return (f"{s['model']} on {s['dataset']}, {s['epochs']} epochs, target {s['target_flops']:.2f} of FLOPs kept "
            f"({took})\n{table}")


# ------------------------------------------------------------------ an `atofx train` run folder, for `atofx report`
RUN_FILES = ("summary.json", "log.jsonl", "widths.json")
# anything `atofx train` leaves in its --out folder, finished or not
RUN_MARKS = (*RUN_FILES, "job.json", "dense.json", "checkpoints")
REWRITE = "rerun the same `atofx train` command to rewrite it (it resumes from the run's checkpoints)"
# summary.json keys the table needs -> what each must be (None allowed only where the run may have none)
NUMBER, _OPTIONAL, _TEXT, _WHOLE = "a number", "a number or null", "a text", "a whole number"
SUMMARY_KEYS = {"model": _TEXT, "dataset": _TEXT, "epochs": _WHOLE, "target_flops": NUMBER, "flops_kept": NUMBER,
                "flops_before": NUMBER, "flops_after": NUMBER, "params_before": NUMBER, "params_after": NUMBER,
                "accuracy_dense": _OPTIONAL, "accuracy_trained": NUMBER, "accuracy_pruned": NUMBER,
                "seconds": NUMBER}


def is_kind(value: Any, kind: str) -> bool:
    """Whether a JSON value is of `kind` (NUMBER: finite, not a bool; WHOLE; TEXT; OPTIONAL: a number or null)."""
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _OPTIONAL and value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if kind == _WHOLE else math.isfinite(value)


def _damaged(path: Path, what: str) -> AtofxError:
    return AtofxError(f"{path} is damaged ({what}): {REWRITE}.")


def _json(path: Path) -> Any:
    """A JSON file's content; a damaged one is an AtofxError naming it."""
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise _damaged(path, "not text") from None
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"not JSON: {exc.msg} at line {exc.lineno}") from None


def _wrong_keys(record: Any, kinds: dict[str, str]) -> str | None:
    """What is wrong with a JSON object that must hold `kinds`' keys, each of its kind; None if nothing."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__.replace('dict', 'object')} where an object belongs"
    for key, kind in kinds.items():
        if key not in record:
            return f"no {key!r}"
        if not is_kind(record[key], kind):
            return f"{key!r} is {json.dumps(record[key])[:40]}, not {kind}"
    return None


def run_folder(path: Path) -> Path:
    """The run folder `atofx report PATH` means (a run's summary.json stands for its folder), or an AtofxError."""
    if path.is_file():
        if path.name == "summary.json":
            return path.parent
        raise AtofxError(f"{path} is a file: give the run folder (the --out folder of an `atofx train` run).")
    if not path.is_dir():
        raise AtofxError(f"run folder {str(path)!r} does not exist; give the --out folder of an `atofx train` run.")
    if not any((path / name).exists() for name in RUN_MARKS):
        raise AtofxError(f"{str(path)!r} holds no `atofx train` run; give the --out folder of one.")
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        raise AtofxError(f"{str(path)!r} lacks {', '.join(missing)}: not a finished `atofx train` run "
                         "(rerun the same `atofx train` command to finish it).")
    return path


def read_run(path: Path) -> tuple[Path, dict[str, Any]]:
    """The run folder and its summary, every file `atofx report` reads checked first: a damaged one is named."""
    folder = run_folder(path)
    summary = _json(folder / "summary.json")
    wrong = _wrong_keys(summary, SUMMARY_KEYS)
    if wrong is None and not is_kind(summary.get("seconds_this_invocation", 0.0), NUMBER):
        wrong = "'seconds_this_invocation' is not a number"
    if wrong:
        raise _damaged(folder / "summary.json", wrong)
    widths = _json(folder / "widths.json")
    layers = widths.get("layers") if isinstance(widths, dict) else None
    wrong = None if isinstance(layers, list) and layers else "no list of layers in it"
    for layer in layers if wrong is None else []:
        wrong = wrong or _wrong_keys(layer, {"name": _TEXT, "before": _WHOLE, "after": _WHOLE})
    if wrong:
        raise _damaged(folder / "widths.json", wrong)
    _check_log(folder / "log.jsonl")
    return folder, summary


def _check_log(path: Path) -> None:
    """Every line of log.jsonl an epoch's record with what the plot reads."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise _damaged(path, "not text") from None
    if not lines:
        raise _damaged(path, "no epoch in it")
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise _damaged(path, f"line {n} is not JSON") from None
        wrong = _wrong_keys(record, {"epoch": _WHOLE, "train_accuracy": NUMBER, "flops_kept": NUMBER})
        if wrong is None and "val_accuracy" in record and not is_kind(record["val_accuracy"], NUMBER):
            wrong = "'val_accuracy' is not a number"
        if wrong:
            raise _damaged(path, f"line {n}: {wrong}")
