"""The options of `atofx train` (`TrainJob`), their checks, and the recipes that set them.

Imports no torch at import time: the command line builds its parser (`atofx train --help`) and refuses bad options from here.
Defaults that are ATO's options come from `ATOConfig`, where each is defined once.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from atofx.ato.config import ATOConfig
from atofx.core.report import format_table
from atofx.errors import AtofxError, ConfigError

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagenet", "folder")
# `atofx train --model NAME` builds these for 32x32 inputs (atofx.app.cifar_models.CIFAR_MODELS)
CIFAR_MODEL_NAMES = ("resnet14", "resnet20", "resnet32", "resnet56", "resnet110", "resnet18_cifar", "resnet34_cifar",
                     "mobilenetv2_cifar")
# digits has 1437 training images: the paper's 5% would give the controller two steps an epoch
CONTROLLER_DATA = {"digits": 0.5}
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class TrainJob:
    """Everything `atofx train` needs; the defaults are the embedded digits run. A recipe file's keys are these fields."""

    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False  # cifar10/cifar100 only: fetch into data_dir
    num_workers: int | None = None  # loader worker processes; None: min(4, CPU count); digits loads in-process
    image_size: int | None = None  # folder/imagenet; None: 32 for atofx's CIFAR models, 224 otherwise
    epochs: int = 30
    batch_size: int = 64  # the global batch: under torchrun each of W ranks loads batch_size / W
    lr: float = 0.1  # for the global batch, not scaled with the ranks; cosine schedule; dense reference alike
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, nesterov) or "adamw" (the authors' ImageNet runs)
    weight_decay: float | None = None  # None: 5e-4 with SGD, 0.05 with AdamW (the official value)
    warmup_epochs: int = 0  # linear lr warm-up over this many epochs before the cosine (official ImageNet: 5)
    label_smoothing: float = 0.0  # official ImageNet: 0.1 (the target model's loss only)
    mixup: float = 0.0  # Beta(alpha, alpha) mixup of the training batches; official ImageNet: 0.2
    target_flops: float = ATOConfig.target_flops
    method: str = ATOConfig.method
    projection: str = ATOConfig.projection
    round_to: int = ATOConfig.round_to  # kept channels per space in multiples of this (8 or 16 run faster on most hardware)
    device: str = "cpu"
    seed: int = ATOConfig.seed
    out: str = "atofx-out"
    dense_reference: bool = True
    progress: bool = True
    controller_data: float | None = None  # None: the dataset's recipe (see controller_share)
    controller_epochs: int | None = None  # passes over D_CN per window epoch; None: ATOConfig.passes decides
    threads: int | None = None  # torch CPU threads; None: 1 for the tiny digits model, torch's default otherwise
    amp: str | None = None  # "bf16", or "fp16" with a grad scaler (on a GPU); None: float32
    channels_last: bool = False  # NHWC memory format for the model and its 4-d inputs (faster convs on recent GPUs)
    # ATO's options (atofx.ato.config.ATOConfig); None: the flavour's value. flavour "official": ATOConfig.official()
    flavour: str = "atofx"
    step_size: str | None = None
    lam_schedule: str | None = None
    lam_boost: float | None = None
    lam_jump_at: float | None = None
    hsp_eps: float | None = None
    sampling: str | None = None
    regularizer: str | None = None
    controller_optimizer: str | None = None
    head_bias: bool | None = None
    freeze_mask: str | None = None
    search_space: str | None = None
    window_mask: str | None = None

    picture: bool = True  # draw OUT/zigs.svg (the space view for large models; `dot` capped at a minute)


ATO_OPTIONS = ("step_size", "lam_schedule", "lam_boost", "lam_jump_at", "hsp_eps", "sampling", "regularizer",
               "controller_optimizer", "head_bias", "freeze_mask", "search_space", "window_mask")
OPTIMIZERS = ("sgd", "adamw")


def ato_config(job: TrainJob) -> ATOConfig:
    """The job's ATOConfig: its flavour, then every ATO option the job sets; checked (ConfigError)."""
    given = {k: getattr(job, k) for k in ATO_OPTIONS if getattr(job, k) is not None}
    try:
        config = ATOConfig.of(job.flavour, target_flops=job.target_flops, method=job.method,
                              projection=job.projection, round_to=job.round_to, seed=job.seed, **given)
        config.validate()
    except ConfigError as exc:  # ATOConfig names its keyword; the user typed a flag
        raise ConfigError(_in_flags(str(exc))) from exc
    return config


def _in_flags(message: str) -> str:
    """An ATOConfig message that starts with an option's name, starting with its `atofx train` flag instead."""
    name = message.split(" ", 1)[0]
    if name not in {f.name for f in fields(TrainJob)} or "on the command line" in message:
        return message
    return flag(name) + message[len(name):]


def check_training(job: TrainJob) -> None:
    """Refuse training options out of range before any epoch runs."""
    if job.optimizer not in OPTIMIZERS:
        raise AtofxError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {job.optimizer!r} (--optimizer).")
    if not 0 <= job.warmup_epochs < job.epochs:
        raise AtofxError(f"warmup_epochs must be in [0, epochs), got {job.warmup_epochs} (--warmup-epochs).")
    if not 0.0 <= job.label_smoothing < 1.0:
        raise AtofxError(f"label_smoothing must be in [0, 1), got {job.label_smoothing} (--label-smoothing).")
    if job.mixup < 0.0:
        raise AtofxError(f"mixup is the Beta distribution's alpha, >= 0 (0: off), got {job.mixup} (--mixup).")
    if job.weight_decay is not None and job.weight_decay < 0:
        raise AtofxError(f"weight_decay must be >= 0, got {job.weight_decay} (--weight-decay).")


# fields that change what the dense reference learns: its stored accuracy is reused only when all match
DENSE_SETTINGS = ("model", "dataset", "data_dir", "image_size", "epochs", "batch_size", "lr", "seed", "optimizer",
                  "weight_decay", "warmup_epochs", "label_smoothing", "mixup")
# fields that change the run but not its results: a rerun may change them and still resume
RUN_ONLY = ("out", "progress", "num_workers", "threads", "download", "device", "dense_reference", "picture")
# field -> the `atofx train` flag that sets it, for messages
FLAGS = {"dense_reference": "--no-dense-reference", "progress": "--quiet", "picture": "--no-picture"}


def flag(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def validate_job(job: TrainJob) -> None:
    """Refuse numbers out of range before any data is loaded or any epoch trained (flags named as typed)."""
    at_least = {"epochs": 1, "batch_size": 1, "num_workers": 0, "threads": 1, "image_size": 1,
                "controller_epochs": 1}
    for name, low in at_least.items():
        value = getattr(job, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ConfigError(f"{flag(name)} must be a whole number >= {low}, got {value!r}.")
    if not job.lr > 0:
        raise ConfigError(f"--lr must be a positive learning rate, got {job.lr!r}.")
    if not isinstance(job.seed, int) or isinstance(job.seed, bool) or not 0 <= job.seed < 2**32:
        raise ConfigError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {job.seed!r}.")
    check_device(job.device)
    if job.controller_data is not None and not 0.0 < job.controller_data <= 1.0:
        raise ConfigError(f"{flag('controller_data')} is a share of the training set, in (0, 1], got "
                          f"{job.controller_data!r}.")


DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")


def check_device(device: str) -> None:
    """Refuse a --device torch does not know or this machine lacks, in flags (torch's and `resolve_device`'s
    messages name Python arguments)."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ConfigError(f"--device must be cpu, cuda, cuda:N (a GPU's number) or auto, got {device!r}.")
    if not device.startswith("cuda"):
        return
    import torch  # here, not at import: the parser and --help load no torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu or "
                          "--device auto.")
    count = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")


def check_round_to(config: ATOConfig, widths: list[int]) -> None:
    """ATOConfig.check_round_to in flags, run once the model is analysed and before the dense reference trains."""
    try:
        config.check_round_to(widths)
    except ConfigError as exc:
        raise ConfigError(_in_flags(str(exc))) from exc


def job_settings(job: TrainJob) -> dict[str, Any]:
    """The fields a resumed run must share with the run that wrote OUT/."""
    return {k: v for k, v in asdict(job).items() if k not in RUN_ONLY}


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _with_suggestion(key: str) -> str:
    """An unknown recipe key with the field it probably means: a near spelling, or a flag's field (no_picture)."""
    names = [f.name for f in fields(TrainJob)]
    flags = {f.removeprefix("--").replace("-", "_"): field for field, f in FLAGS.items()}
    if key in flags:
        return f"{key} (the flag {FLAGS[flags[key]]}; as a key: {flags[key]}: false)"
    near = difflib.get_close_matches(key, names, n=1)
    return f"{key} (did you mean {near[0]}?)" if near else key


def recipe_path(name: str | Path) -> Path:
    """The recipe file `name` names: a path, or a shipped recipe's name (`cifar10-resnet56-55`) or file name, read
    from RECIPES wherever the command runs."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = [RECIPES / path.name, *(RECIPES / (path.name + suffix) for suffix in RECIPE_SUFFIXES)]
    found = next((f for f in shipped if f.is_file()), None)
    if found is None:
        names = sorted(f.stem for f in RECIPES.glob("*") if f.suffix in RECIPE_SUFFIXES) if RECIPES.is_dir() else []
        near = difflib.get_close_matches(path.stem, names, n=1)
        raise AtofxError(f"recipe file {str(path)!r} does not exist"
                         + (f"; did you mean {near[0]!r}? The" if near else "; the")
                         + f" recipes shipped with atofx are in {RECIPES} (`atofx recipes` lists them; --config "
                         "takes a recipe's name or a file).")
    return found


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file (YAML or JSON), or a shipped recipe's name, as a dict of TrainJob fields; unknown keys and wrong
    types are refused."""
    path = recipe_path(path)
    if path.suffix not in RECIPE_SUFFIXES:
        raise AtofxError(f"recipe file {str(path)!r}: use a .yaml, .yml or .json file.")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise AtofxError(f"recipe file {str(path)!r} cannot be read: {' '.join(str(exc).split())}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise AtofxError(f"recipe file {str(path)!r} must be a mapping of TrainJob fields (key: value).")
    known = {f.name: f for f in fields(TrainJob)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise AtofxError(f"recipe file {str(path)!r}: unknown key(s) {', '.join(map(_with_suggestion, unknown))}; "
                         f"known: {', '.join(known)}.")
    return {key: _recipe_value(path, key, value) for key, value in data.items()}


# a TrainJob field's type (its annotation without "| None") -> what a recipe value of it must be, in words
TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string"}


def _recipe_value(path: Path, key: str, value: Any) -> Any:
    """A recipe's value for field `key`, checked against the field's type; a whole float (epochs: 6.0) is taken for
    an int field, and an int for a float field."""
    annotation = next(f.type for f in fields(TrainJob) if f.name == key)
    expected = annotation.split(" | ")[0]
    if expected not in TYPE_WORDS or (value is None and annotation.endswith("| None")):
        return value
    if value is None:
        raise AtofxError(f"recipe file {str(path)!r}: {key} must be {TYPE_WORDS[expected]}, got nothing (leave the "
                         "key out for its default).")
    if expected == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    python_type = {"int": int, "float": float, "bool": bool, "str": str}[expected]
    if isinstance(value, python_type) and (expected == "bool" or not isinstance(value, bool)):
        return value
    raise AtofxError(f"recipe file {str(path)!r}: {key} must be {TYPE_WORDS[expected]}, got {value!r}.")


def paper_figures(path: Path) -> dict[str, str]:
    """The paper's baseline and pruned top-1 from a recipe's `# paper: baseline X, pruned Y` header line."""
    for line in path.read_text().splitlines():
        if line.startswith("# paper:"):
            figures = dict(part.strip().split(" ", 1) for part in line.removeprefix("# paper:").split(","))
            return {"baseline": figures.get("baseline", "?"), "pruned": figures.get("pruned", "?")}
    return {"baseline": "?", "pruned": "?"}


def recipes_table(folder: Path = RECIPES) -> str:
    """One row per recipe file: what it trains, its FLOPs target, the paper's figures and the training setup."""
    files = sorted(f for f in folder.glob("*") if f.suffix in RECIPE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise AtofxError(f"no recipe in {folder}: the recipes ship with the atofx repository (recipes/).")
    rows = []
    for f in files:
        job = TrainJob(**load_recipe(f))
        paper = paper_figures(f)
        rows.append([f.stem, job.model, job.dataset, f"{100 * (1 - job.target_flops):.1f}%", f"{job.target_flops:.3f}",
                     paper["baseline"], paper["pruned"], str(job.epochs), str(job.batch_size),
                     f"{job.optimizer} {job.lr:g}"])
    header = ["recipe", "model", "dataset", "pruned", "FLOPs kept", "paper dense", "paper ATO", "epochs",
              "global batch", "optimizer, lr"]
    return format_table(header, rows)


def controller_share(job: TrainJob, n_train: int) -> float:
    """Share of the training set in D_CN: the job's, else ATOConfig's (0.05 in the paper), 0.5 on digits, and on a
    small folder enough for about 1000 images (at most half of it) so the controller gets several steps."""
    if job.controller_data is not None:
        return job.controller_data
    if job.dataset == "folder":
        return max(ATOConfig.controller_data, min(0.5, 1000 / max(n_train, 1)))
    return CONTROLLER_DATA.get(job.dataset, ATOConfig.controller_data)


