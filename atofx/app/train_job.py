"""`atofx train`: one ATO run from data to a pruned model on disk, with a summary table.

Batch size under torchrun: a job's `batch_size` is the *global* batch (what a recipe states); each of
the W ranks loads `batch_size / W` samples a step (refused unless W divides it), and the learning rate
is the recipe's, unscaled: 1 rank or 8, a step sees the same number of samples at the same rate, and
the controller takes as many steps per epoch.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atofx.app.cifar_models import CIFAR_MODELS
from atofx.app.datasets import DATASETS, load_images, loaders
from atofx.app.plots import draw_run_plots
from atofx.ato import distributed
from atofx.ato.config import ATOConfig
from atofx.ato.loop import evaluate
from atofx.ato.model import compile as compile_model
from atofx.ato.model import resolve_device
from atofx.ato.plain_training import train_plain
from atofx.core.counting import count_flops, count_params
from atofx.core.report import format_table
from atofx.core.serialization import save
from atofx.errors import AtofxError, ConfigError

# digits has 1437 training images: the paper's 5% would give the controller two steps an epoch
CONTROLLER_DATA = {"digits": 0.5}
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
# a small dataset's D_CN may be one batch: repeat it so the controller still learns (digits and CIFAR have >= 10)
MIN_CONTROLLER_STEPS = 10


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
    target_flops: float = 0.5
    method: str = "ato"
    projection: str = "prox"
    round_to: int = 1  # kept channels per space in multiples of this (8 or 16 run faster on most hardware)
    device: str = "cpu"
    seed: int = 0
    out: str = "atofx-out"
    dense_reference: bool = True
    progress: bool = True
    controller_data: float | None = None  # None: the dataset's recipe (0.05 as in the paper; see controller_share)
    controller_epochs: int | None = None  # passes over D_CN per epoch; None: enough for MIN_CONTROLLER_STEPS steps
    threads: int | None = None  # torch CPU threads; None: 1 for the tiny digits model, torch's default otherwise
    amp: str | None = None  # "bf16", or "fp16" with a grad scaler (on a GPU); None: float32
    channels_last: bool = False  # NHWC memory format for the model and its 4-d inputs (faster convs on recent GPUs)
    # ATO's options (trainer.ATOConfig); None: the flavour's value. flavour "official": ATOConfig.official()
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

    picture: bool = True  # draw OUT/zigs.svg (the space view for large models; `dot` capped at a minute)


ATO_OPTIONS = ("step_size", "lam_schedule", "lam_boost", "lam_jump_at", "hsp_eps", "sampling", "regularizer",
               "controller_optimizer", "head_bias", "freeze_mask", "search_space")
OPTIMIZERS = ("sgd", "adamw")


def ato_config(job: TrainJob) -> ATOConfig:
    """The job's ATOConfig: its flavour, then every ATO option the job sets; checked (ConfigError)."""
    given = {k: getattr(job, k) for k in ATO_OPTIONS if getattr(job, k) is not None}
    config = ATOConfig.of(job.flavour, target_flops=job.target_flops, method=job.method, projection=job.projection,
                          round_to=job.round_to, seed=job.seed, **given)
    config.validate()
    return config


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


def rank_batch_size(global_batch: int, world: int) -> int:
    """Each rank's batch: the global batch over the ranks; refused unless they divide it."""
    if global_batch < 1 or global_batch % world:
        raise AtofxError(f"batch_size is the global batch and must split evenly over the {world} ranks, got "
                         f"{global_batch}: give a multiple of {world} (--batch-size).")
    return global_batch // world


def job_optimizer(job: TrainJob, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """The job's optimiser and schedule: SGD or AdamW, then `warmup_epochs` of linear warm-up (from lr/W up
    to lr, as the authors' GradualWarmupScheduler) and a cosine over the remaining epochs."""
    if job.optimizer == "adamw":
        wd = 0.05 if job.weight_decay is None else job.weight_decay
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=wd)
    else:
        wd = 5e-4 if job.weight_decay is None else job.weight_decay
        opt = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=0.9, nesterov=True, weight_decay=wd)
    warm = job.warmup_epochs
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(job.epochs - warm, 1))
    if warm <= 1:
        return opt, cosine
    ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm - 1)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [ramp, cosine], milestones=[warm])


class SoftTargetLoader:
    """A training loader whose batches carry class probabilities: label smoothing, then mixup.

    Smoothing spreads `smoothing` over the classes (the authors' `one_hot`); mixup blends each batch with a
    shuffled copy of itself, inputs and targets alike, with a weight drawn from Beta(alpha, alpha). Every
    other attribute (dataset, sampler, batch_size, collate_fn) is the wrapped loader's, so the controller's
    subset D_CN is drawn from the clean data. `generator` (mixup's draws) is checkpointed with the run.
    """

    def __init__(self, loader: Any, classes: int, smoothing: float, alpha: float, seed: int):
        self.loader, self.classes, self.smoothing, self.alpha = loader, classes, smoothing, alpha
        self.generator = torch.Generator().manual_seed(seed + 3)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for x, y in self.loader:
            yield self.soften(x, y)

    def soften(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = nn.functional.one_hot(y, self.classes).float() * (1.0 - self.smoothing) + self.smoothing / self.classes
        if self.alpha > 0 and len(y) > 1:
            # torch's Beta takes no generator: numpy's, seeded from ours, keeps the draws resumable
            seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
            w = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
            perm = torch.randperm(len(y), generator=self.generator).to(y.device)
            x = w * x + (1.0 - w) * x[perm]
            target = w * target + (1.0 - w) * target[perm]
        return x, target


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
    if job.controller_data is not None and not 0.0 < job.controller_data <= 1.0:
        raise ConfigError(f"controller_data must be in (0, 1], got {job.controller_data!r}.")


def job_settings(job: TrainJob) -> dict[str, Any]:
    """The fields a resumed run must share with the run that wrote OUT/."""
    return {k: v for k, v in asdict(job).items() if k not in RUN_ONLY}


def check_same_run(job: TrainJob, out: Path) -> None:
    """Refuse, before any training, to resume OUT/checkpoints written with other settings; say how to go on."""
    record, ckpt_dir = out / "job.json", out / "checkpoints"
    if not record.exists() or not any(ckpt_dir.glob("checkpoint*.pt")):
        return
    try:
        old = json.loads(record.read_text())
    except ValueError:
        return  # a damaged record: the checkpoint's own fingerprint still guards the resume
    new = job_settings(job)
    diff = [k for k in new if k in old and old[k] != new[k]]
    if diff:
        changes = ", ".join(f"{flag(k)} {old[k]} -> {new[k]}" for k in diff)
        raise ConfigError(
            f"{out} holds an unfinished or finished run with other settings ({changes}). Give another --out for "
            f"the new run, or delete {ckpt_dir} to train afresh in {out}.")


def _dense_reference(job: TrainJob, out: Path) -> dict[str, Any] | None:
    """OUT/dense.json if it was written with the same dense settings, else None (it is then trained again)."""
    path = out / "dense.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        return None
    want = {k: getattr(job, k) for k in DENSE_SETTINGS}
    return stored if stored.get("settings") == want and "accuracy_dense" in stored else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Through a temporary file, so an interrupt never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file (YAML or JSON) as a dict of TrainJob fields; unknown keys and wrong types are refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AtofxError(f"recipe file {str(path)!r} does not exist; the recipes shipped with atofx are in recipes/.")
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
        raise AtofxError(f"recipe file {str(path)!r}: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}.")
    defaults = TrainJob()
    for key, value in data.items():
        expected = type(getattr(defaults, key))
        if value is None or getattr(defaults, key) is None or isinstance(value, expected) \
                or (expected is float and isinstance(value, int) and not isinstance(value, bool)):
            continue
        raise AtofxError(f"recipe file {str(path)!r}: {key} must be a {expected.__name__}, got {value!r}.")
    return data


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


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
    """Share of the training set in D_CN: the job's, else 0.05 as in the paper, 0.5 on digits, and on a
    small folder enough for about 1000 images (at most half of it) so the controller gets several steps."""
    if job.controller_data is not None:
        return job.controller_data
    if job.dataset == "folder":
        return max(0.05, min(0.5, 1000 / max(n_train, 1)))
    return CONTROLLER_DATA.get(job.dataset, 0.05)


def controller_passes(job: TrainJob, n_train: int) -> int:
    """Passes over D_CN per epoch: the job's, else as many as give the controller MIN_CONTROLLER_STEPS steps."""
    if job.controller_epochs is not None:
        return job.controller_epochs
    batches = math.ceil(math.ceil(controller_share(job, n_train) * n_train) / job.batch_size)
    return max(1, math.ceil(MIN_CONTROLLER_STEPS / max(batches, 1)))


def uses_cifar_model(job: TrainJob) -> bool:
    return job.model in CIFAR_MODELS


def _data(job: TrainJob, pin_memory: bool = False) -> tuple[Any, Any, int, int, tuple[int, ...]]:
    """(train loader, val loader, classes, input channels, example input shape); each rank loads its share of
    the global batch (`rank_batch_size`)."""
    batch = rank_batch_size(job.batch_size, distributed.current().world)
    if job.dataset == "digits":
        from atofx.app.datasets import digits_loaders

        train, val = digits_loaders(batch, job.seed)
        return train, val, 10, 1, (1, 1, 8, 8)
    if job.dataset not in DATASETS:
        raise AtofxError(f"unknown dataset {job.dataset!r}; available: {', '.join(DATASETS)}.")
    if job.image_size is not None and job.image_size <= 0:
        raise AtofxError(f"image_size must be a positive number of pixels, got {job.image_size}.")
    size = job.image_size or (32 if uses_cifar_model(job) else 224)
    data = load_images(job.dataset, job.data_dir, size, job.download)
    train, val = loaders(data, batch, job.seed, job.num_workers, pin_memory)
    return train, val, data.classes, data.channels, data.example_shape


def _model(job: TrainJob, classes: int, channels: int) -> nn.Module:
    """atofx's CIFAR models and torchvision's with the dataset's classes; a user's factory as it is."""
    from atofx.app import model_zoo

    torch.manual_seed(job.seed)
    if job.model in CIFAR_MODELS:
        return CIFAR_MODELS[job.model](num_classes=classes, in_channels=channels)
    if ":" in job.model:
        return model_zoo._load_factory(job.model, None)[0]
    if job.model not in model_zoo.torchvision_models():
        import difflib

        names = [*CIFAR_MODELS, *model_zoo.torchvision_models()]
        close = difflib.get_close_matches(job.model, names, n=3, cutoff=0.5)
        raise model_zoo.ModelNotFoundError(
            f"unknown model {job.model!r}: " + (f"did you mean {', '.join(close)}? " if close else "")
            + f"Give a CIFAR model ({', '.join(CIFAR_MODELS)}), a torchvision classification model or "
            "package.module:factory.")
    if channels != 3:
        raise AtofxError(f"torchvision's {job.model} takes 3-channel images but {job.dataset} has {channels}; "
                         f"use a CIFAR model ({', '.join(CIFAR_MODELS)}) or an RGB dataset.")
    import torchvision

    extra = {"aux_logits": False, "init_weights": False} if job.model in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(job.model, weights=None, num_classes=classes, **extra)


def _out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels  # type: ignore[return-value]


def layer_widths(dense: nn.Module, pruned: nn.Module) -> list[dict[str, Any]]:
    """Output width of every conv and linear layer of `dense`, before and after pruning (0: layer removed)."""
    after = dict(pruned.named_modules())
    rows = []
    for name, layer in dense.named_modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            small = after.get(name)
            rows.append({"name": name, "type": type(layer).__name__, "before": _out_width(layer),
                         "after": _out_width(small) if isinstance(small, type(layer)) else 0})
    return rows


def _device_type(device: str) -> str:
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "cuda" if wants_cuda else "cpu"


def run(job: TrainJob) -> dict[str, Any]:
    """Train the dense reference (optional) and ATO, prune, and write OUT/: pruned model, summary, log, picture.

    Under torchrun every rank runs this; they share the work, and rank 0 alone writes OUT/.
    """
    started = time.perf_counter()
    # the job's, ATO's and the training's options are checked before the dense reference spends its epochs
    validate_job(job)
    config = ato_config(job)
    check_training(job)
    out = Path(job.out)
    check_same_run(job, out)
    ranks = distributed.start(_device_type(job.device))
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "job.json", job_settings(job))
    progress = job.progress and ranks.main
    threads = job.threads if job.threads is not None else (1 if job.dataset == "digits" else None)
    if threads is not None:
        # digits convolutions are tiny: a second thread only adds synchronisation, and on a busy machine
        # spinning threads make them tens of times slower
        torch.set_num_threads(threads)
    device = resolve_device(job.device, nn.Linear(1, 1))
    train_loader, val_loader, classes, channels, example_shape = _data(job, pin_memory=device.type == "cuda")
    if job.label_smoothing > 0 or job.mixup > 0:
        train_loader = SoftTargetLoader(train_loader, classes, job.label_smoothing, job.mixup, job.seed)
    loss_fn = nn.functional.cross_entropy
    model = _model(job, classes, channels)
    dense_model = copy.deepcopy(model)
    example = (torch.randn(example_shape, generator=torch.Generator().manual_seed(job.seed)),)

    accuracy_dense, earlier_seconds = None, 0.0  # seconds earlier invocations spent on what this one reuses
    if job.dense_reference:
        stored = _dense_reference(job, out)
        if stored is not None:
            accuracy_dense, earlier_seconds = stored["accuracy_dense"], stored.get("seconds", 0.0)
        else:
            dense_started = time.perf_counter()
            train_plain(dense_model, train_loader, job.epochs, device, job.seed, loss_fn, progress,
                        make_optimizer=lambda m: job_optimizer(job, m))
            accuracy_dense = evaluate(dense_model, val_loader, device, loss_fn)["accuracy"]
            if ranks.main:  # kept across an interrupt: a rerun with the same settings does not train it again
                _write_json(out / "dense.json", {"accuracy_dense": accuracy_dense,
                                                 "seconds": time.perf_counter() - dense_started,
                                                 "settings": {k: getattr(job, k) for k in DENSE_SETTINGS}})
    done = _finished_epochs(out / "checkpoints")
    if done:
        earlier_seconds += sum(r.get("seconds", 0.0) for r in done)
        if progress and len(done) < job.epochs:
            print(f"atofx: resuming from epoch {len(done) + 1} of {job.epochs} (epochs 1-{len(done)} are "
                  f"checkpointed in {out / 'checkpoints'})", flush=True)
        elif progress:
            print(f"atofx: all {job.epochs} epochs are checkpointed in {out / 'checkpoints'}; pruning and writing "
                  "the results again", flush=True)

    ato = compile_model(model, example)
    flops_before, params_before = count_flops(model, example), count_params(model)
    picture = ato.visualize(out / "zigs.svg") if ranks.main and job.picture else None
    optimizer, scheduler = job_optimizer(job, model)
    options = {k: v for k, v in asdict(config).items() if k in ATO_OPTIONS}
    ato.train(train_loader, job.epochs, target_flops=job.target_flops, val_loader=val_loader, method=job.method,
              optimizer=optimizer, scheduler=scheduler, amp=job.amp, channels_last=job.channels_last,
              projection=job.projection, round_to=job.round_to, device=device, seed=job.seed, **options,
              checkpoint_dir=out / "checkpoints", log_path=out / "log.jsonl", progress=progress,
              controller_data=controller_share(job, len(train_loader.dataset)),
              controller_epochs=controller_passes(job, len(train_loader.dataset)))
    accuracy_trained = evaluate(model, val_loader, device, loss_fn)["accuracy"]
    small = ato.prune()
    accuracy_pruned = evaluate(small, val_loader, device, loss_fn)["accuracy"]
    small_cpu = copy.deepcopy(small).cpu().to(memory_format=torch.contiguous_format)
    flops_after, params_after = count_flops(small_cpu, example), count_params(small_cpu)
    summary = {
        "model": job.model,
        "dataset": job.dataset,
        "method": job.method,
        "target_flops": job.target_flops,
        "flops_kept": flops_after / flops_before,
        "pruned_flops": 1.0 - flops_after / flops_before,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "params_before": params_before,
        "params_after": params_after,
        "accuracy_dense": accuracy_dense,
        "accuracy_trained": accuracy_trained,
        "accuracy_pruned": accuracy_pruned,
        "epochs": job.epochs,
        "ranks": ranks.world,
        "seconds": earlier_seconds + time.perf_counter() - started,  # the whole run, over every invocation
        "seconds_this_invocation": time.perf_counter() - started,
        "picture": picture.name if picture is not None else None,
        "job": asdict(job),
        "ato": asdict(config),  # every ATO option the run used, the flavour's included
    }
    if ranks.main:
        save(small_cpu, out / "pruned.pt", example)
        (out / "widths.json").write_text(json.dumps({"model": job.model,
                                                     "layers": layer_widths(dense_model, small_cpu)}, indent=1))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        draw_run_plots(out)
    distributed.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    return summary


def _finished_epochs(folder: Path) -> list[dict[str, Any]]:
    """The per-epoch records of the checkpoint a rerun resumes from ([] without one)."""
    from atofx.ato.checkpoint import read_latest

    try:
        saved, _ = read_latest(folder)
    except AtofxError:
        return []  # fit names the problem with the checkpoint itself
    return list(saved.get("history", [])) if saved else []


def summary_table(s: dict[str, Any]) -> str:
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
