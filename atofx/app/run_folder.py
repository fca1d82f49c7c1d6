"""What `atofx train` finds in its --out folder before it trains, and what it keeps there.

A rerun resumes OUT/checkpoints only with the settings that wrote them (OUT/job.json, else the checkpoint's own
fingerprint), refused in flags before anything is trained or written; a run that starts afresh removes an earlier
run's results; OUT/dense.json is reused when its settings match and is whole.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atofx.app.options import (
    ATO_OPTIONS,
    CONTROLLER_DATA,
    DENSE_SETTINGS,
    TrainJob,
    controller_share,
    flag,
    job_settings,
)
from atofx.app.run_summary import NUMBER, is_kind
from atofx.ato import distributed
from atofx.ato.checkpoint import check_ranks, fingerprint, read_latest
from atofx.ato.config import ATOConfig
from atofx.core.files import atomic_write_text, make_folder
from atofx.errors import ConfigError

if TYPE_CHECKING:
    from atofx.ato.model import ATOModel


def _shown(value: Any) -> str:
    """A setting as typed on the command line; one left to its default is "unset"."""
    return "unset" if value is None else str(value)


def _recorded_settings(out: Path) -> dict[str, Any] | None:
    """The settings OUT/job.json records, or None when it is missing or damaged."""
    try:
        old = json.loads((out / "job.json").read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _effective(name: str, settings: dict[str, Any]) -> Any:
    """The value a run uses for setting `name`: the one given, or for an ATO option left unset its flavour's default
    (and for --controller-data the dataset's share), so that typing a default is the same run as leaving it out."""
    value = settings[name]
    if value is not None:
        return value
    if name in ATO_OPTIONS:
        return getattr(ATOConfig.of(settings.get("flavour") or "atofx"), name)
    if name == "controller_data" and settings.get("dataset") != "folder":  # a folder's share depends on its size
        return CONTROLLER_DATA.get(settings.get("dataset"), ATOConfig.controller_data)
    return value


def check_same_run(job: TrainJob, out: Path) -> None:
    """Refuse, before any training, to resume OUT/checkpoints written with other settings; say how to go on."""
    ckpt_dir = out / "checkpoints"
    old = _recorded_settings(out)
    if old is None or not any(ckpt_dir.glob("checkpoint*.pt")):
        return  # without a record, check_checkpoint compares the checkpoint's own fingerprint
    new = job_settings(job)
    diff = [k for k in new if k in old and _effective(k, old) != _effective(k, new)]
    if diff:
        changes = ", ".join(f"{flag(k)} {_shown(old[k])} -> {_shown(new[k])}" for k in diff)
        raise ConfigError(
            f"{out} holds an unfinished or finished run with other settings ({changes}). Give another --out for "
            f"the new run, or delete {ckpt_dir} to train afresh in {out}.")


def job_fingerprint(job: TrainJob, config: ATOConfig, ato: ATOModel, train_loader: Any) -> dict[str, Any]:
    """What a checkpoint of this job records (`checkpoint.fingerprint`), known before any training; of ATO's options
    those the job sets (the trainer adds what it derives, which a comparison skips)."""
    options = asdict(config) | {"controller_data": controller_share(job, len(train_loader.dataset)),
                                "controller_epochs": job.controller_epochs}
    return fingerprint(ato.model, options, job.epochs, len(train_loader), distributed.current().world)


# fingerprint entries that are no TrainJob field -> the flag that changes them (ATOConfig's others: --flavour)
_FINGERPRINT_FLAGS = {"model": "--model or --dataset", "min_keep": "--model",
                      "batches_per_epoch": "--batch-size or --dataset", "ranks": "the number of torchrun ranks"}


def check_checkpoint(out: Path, saved: dict[str, Any], new: dict[str, Any]) -> None:
    """Without a readable OUT/job.json, the checkpoint's fingerprint against the job's (`new`): a rerun with other
    settings is refused, in flags, before anything is trained or written, not by `fit` after the dense reference."""
    old = dict(saved.get("fingerprint") or {})
    try:
        old_config = json.loads(old.pop("config", "{}"))
    except (TypeError, ValueError):
        old_config = {}
    new = dict(new)
    changed = {k: (old_config[k], v) for k, v in json.loads(new.pop("config")).items()
               if k in old_config and old_config[k] != v}
    changed |= {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}
    if not changed:
        return
    job_fields = {f.name for f in fields(TrainJob)} - set(_FINGERPRINT_FLAGS)
    said = [f"{flag(k)} {_shown(a)} -> {_shown(b)}" if k in job_fields else _FINGERPRINT_FLAGS.get(k, "--flavour")
            for k, (a, b) in changed.items()]
    ckpt_dir = out / "checkpoints"
    raise ConfigError(
        f"{ckpt_dir} holds a checkpoint of a run with other settings ({', '.join(dict.fromkeys(said))}), and "
        f"{out / 'job.json'}, which would name that run's flags, is missing or damaged. Rerun that run's command to "
        f"resume it, give another --out for the new run, or delete {ckpt_dir} to train afresh in {out}.")


def dense_reference(job: TrainJob, out: Path, progress: bool) -> dict[str, Any] | None:
    """OUT/dense.json if it was written with the same dense settings, else None (it is then trained again); a
    damaged one is as good as none (said when `progress`)."""
    path = out / "dense.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict) or not is_kind(stored.get("accuracy_dense"), NUMBER) \
            or not is_kind(stored.get("seconds", 0.0), NUMBER):
        if progress:
            print(f"atofx: {path} is damaged; training the dense reference again", flush=True)
        return None
    want = {k: getattr(job, k) for k in DENSE_SETTINGS}
    return stored if stored.get("settings") == want else None


# what a finished `run` writes into OUT/: a run that starts afresh removes an earlier run's, which `atofx report`
# and users would otherwise take for its own (dense.json is reused when its settings match; job.json is rewritten)
RESULT_FILES = ("summary.json", "pruned.pt", "widths.json", "accuracy_flops.png", "widths.png", "zigs.svg", "zigs.dot")


def prepare_out(job: TrainJob, out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint this run resumes from (None: it starts afresh), checked before anything is written; then
    OUT/ made (rank 0), an earlier run's results removed when starting afresh, and OUT/job.json written."""
    saved, _ = read_latest(out / "checkpoints")  # fit says what a damaged one is; one that carries code stops here
    if saved is not None:  # the ranks are no flag job.json records
        check_ranks(saved, fingerprint["ranks"], out / "checkpoints")
    if saved is not None and _recorded_settings(out) is None:
        check_checkpoint(out, saved, fingerprint)
    if distributed.current().main:  # written once the data and the model are known to work: a refused run leaves
        make_folder(out, "give another --out")  # no folder
        for name in RESULT_FILES if saved is None else ():
            (out / name).unlink(missing_ok=True)
        atomic_write_text(out / "job.json", json.dumps(job_settings(job), indent=1))
    return saved
