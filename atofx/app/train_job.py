"""`atofx train`: one ATO run from data to a pruned model on disk, with a summary table.

Batch size under torchrun: a job's `batch_size` is the *global* batch (what a recipe states); each of
the W ranks loads `batch_size / W` samples a step (refused unless W divides it), and the learning rate
is the recipe's, unscaled: 1 rank or 8, a step sees the same number of samples at the same rate, and
the controller takes as many steps per epoch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atofx.app import model_zoo
from atofx.app.cifar_models import CIFAR_MODELS
from atofx.app.datasets import load_images, loaders
from atofx.app.options import (
    ATO_OPTIONS,
    DATASETS,
    DENSE_SETTINGS,
    TrainJob,
    ato_config,
    check_round_to,
    check_training,
    controller_share,
    validate_job,
)
from atofx.app.plots import draw_run_plots
from atofx.app.run_folder import check_same_run, dense_reference, job_fingerprint, prepare_out
from atofx.ato import distributed
from atofx.ato.config import ATOConfig
from atofx.ato.loop import evaluate
from atofx.ato.model import ATOModel, resolve_device
from atofx.ato.model import compile as compile_model
from atofx.ato.plain_training import train_plain
from atofx.core.counting import count_flops, count_params
from atofx.core.files import atomic_write_text
from atofx.core.serialization import save
from atofx.errors import AtofxError, ShapeError, TraceError


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
    torch.manual_seed(job.seed)
    if job.model in CIFAR_MODELS:
        return CIFAR_MODELS[job.model](num_classes=classes, in_channels=channels)
    if ":" in job.model:
        return model_zoo._load_factory(job.model, None)[0]
    if job.model not in model_zoo.torchvision_models():
        raise model_zoo.unknown_model(job.model, list(CIFAR_MODELS), f"Give a CIFAR model ({', '.join(CIFAR_MODELS)}), "
                                      "a torchvision classification model or package.module:factory.")
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
    model = _model(job, classes, channels)
    dense_model = copy.deepcopy(model)
    example = (torch.randn(example_shape, generator=torch.Generator().manual_seed(job.seed)),)
    ato = _analysed(job, model, example)
    check_round_to(config, [s.width for s in ato.zigs.prunable])
    saved = prepare_out(job, out, job_fingerprint(job, config, ato, train_loader))
    accuracy_dense, earlier_seconds = _dense_accuracy(job, out, dense_model, train_loader, val_loader, device, progress)
    earlier_seconds += _resumed_seconds(job, out, saved, progress)
    small, measured = _train_and_prune(job, config, out, ato, example, (train_loader, val_loader), device, progress)
    summary = {
        "model": job.model,
        "dataset": job.dataset,
        "method": job.method,
        "target_flops": job.target_flops,
        "flops_kept": measured["flops_after"] / measured["flops_before"],
        "pruned_flops": 1.0 - measured["flops_after"] / measured["flops_before"],
        **{k: measured[k] for k in ("flops_before", "flops_after", "params_before", "params_after")},
        "accuracy_dense": accuracy_dense,
        "accuracy_trained": measured["accuracy_trained"],
        "accuracy_pruned": measured["accuracy_pruned"],
        "epochs": job.epochs,
        "ranks": ranks.world,
        "seconds": earlier_seconds + time.perf_counter() - started,  # the whole run, over every invocation
        "seconds_this_invocation": time.perf_counter() - started,
        "picture": measured["picture"],
        "job": asdict(job),
        # every ATO option the run used, the flavour's included, and the controller's share of this dataset
        "ato": asdict(config) | {"controller_data": measured["controller_data"]},
    }
    if ranks.main:
        save(small, out / "pruned.pt", example)
        atomic_write_text(out / "widths.json", json.dumps({"model": job.model,
                                                           "layers": layer_widths(dense_model, small)}, indent=1))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        draw_run_plots(out)
    distributed.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    return summary


def _analysed(job: TrainJob, model: nn.Module, example: tuple) -> ATOModel:
    """`model` traced and analysed on a batch shaped like the data's, so that a model that does not fit the data,
    or that torch.fx cannot trace, is refused before the dense reference spends its epochs; in flags."""
    try:
        return compile_model(model, example)
    except ShapeError as exc:
        size = "x".join(map(str, example[0].shape[1:]))
        resize = " (or another --image-size)" if job.dataset in ("folder", "imagenet") else ""
        raise model_zoo.misfit(exc, f"--model {job.model} does not take {job.dataset} images ({size}): give a "
                                    f"model made for them{resize}.") from exc
    except TraceError as exc:
        raise model_zoo.untraceable(exc, f"--model {job.model}") from exc


def _dense_accuracy(job: TrainJob, out: Path, dense_model: nn.Module, train_loader: Any, val_loader: Any,
                    device: torch.device, progress: bool) -> tuple[float | None, float]:
    """The dense reference's accuracy (None without one) and the seconds an earlier invocation spent on it:
    OUT/dense.json when it holds this job's dense settings, else the model trained now and recorded there."""
    if not job.dense_reference:
        return None, 0.0
    stored = dense_reference(job, out, progress)
    if stored is not None:
        return stored["accuracy_dense"], stored.get("seconds", 0.0)
    started = time.perf_counter()
    loss_fn = nn.functional.cross_entropy
    with _rewound(train_loader):
        train_plain(dense_model, train_loader, job.epochs, device, job.seed, loss_fn, progress,
                    make_optimizer=lambda m: job_optimizer(job, m))
    accuracy = evaluate(dense_model, val_loader, device, loss_fn)["accuracy"]
    if distributed.current().main:  # kept across an interrupt: a rerun with the same settings does not train it again
        atomic_write_text(out / "dense.json", json.dumps({
            "accuracy_dense": accuracy, "seconds": time.perf_counter() - started,
            "settings": {k: getattr(job, k) for k in DENSE_SETTINGS}}, indent=1))
    return accuracy, 0.0


@contextlib.contextmanager
def _rewound(loader: Any) -> Iterator[None]:
    """Afterwards the loader's random streams (its shuffle, mixup's draws) and torch's are where they were before,
    so ATO sees the same batches whether the dense reference trained in this process or was read from dense.json."""
    generators = {id(g): g for g in (getattr(loader, "generator", None), loader.__dict__.get("generator"),
                                     getattr(loader.__dict__.get("loader"), "generator", None))
                  if isinstance(g, torch.Generator)}
    states = [(g, g.get_state()) for g in generators.values()]
    torch_state = torch.get_rng_state()
    try:
        yield
    finally:
        for g, state in states:
            g.set_state(state)
        torch.set_rng_state(torch_state)


def _resumed_seconds(job: TrainJob, out: Path, saved: dict[str, Any] | None, progress: bool) -> float:
    """The seconds of the epochs a rerun resumes (0 on a fresh run), saying where it resumes."""
    done = list(saved.get("history", [])) if saved else []
    if not done:
        return 0.0
    where = "epoch 1 is" if len(done) == 1 else f"epochs 1-{len(done)} are"
    if progress and len(done) < job.epochs:
        print(f"atofx: resuming from epoch {len(done) + 1} of {job.epochs} ({where} checkpointed in "
              f"{out / 'checkpoints'})", flush=True)
    elif progress:
        print(f"atofx: all {job.epochs} epochs are checkpointed in {out / 'checkpoints'}; pruning and writing "
              "the results again", flush=True)
    return sum(r.get("seconds", 0.0) for r in done)


def _train_and_prune(job: TrainJob, config: ATOConfig, out: Path, ato: ATOModel, example: tuple,
                     data: tuple[Any, Any], device: torch.device, progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Train with ATO (resuming from OUT/checkpoints) and prune; the pruned model on the CPU and its figures."""
    train_loader, val_loader = data
    loss_fn = nn.functional.cross_entropy
    model = ato.model
    flops_before, params_before = count_flops(model, example), count_params(model)
    picture = ato.visualize(out / "zigs.svg") if distributed.current().main and job.picture else None
    optimizer, scheduler = job_optimizer(job, model)
    options = {k: v for k, v in asdict(config).items() if k in ATO_OPTIONS}
    share = controller_share(job, len(train_loader.dataset))
    ato.train(train_loader, job.epochs, target_flops=job.target_flops, val_loader=val_loader, method=job.method,
              optimizer=optimizer, scheduler=scheduler, amp=job.amp, channels_last=job.channels_last,
              projection=job.projection, round_to=job.round_to, device=device, seed=job.seed, **options,
              checkpoint_dir=out / "checkpoints", log_path=out / "log.jsonl", progress=progress,
              controller_data=share,
              controller_epochs=job.controller_epochs)
    accuracy_trained = evaluate(model, val_loader, device, loss_fn)["accuracy"]
    small = ato.prune()
    accuracy_pruned = evaluate(small, val_loader, device, loss_fn)["accuracy"]
    small_cpu = copy.deepcopy(small).cpu().to(memory_format=torch.contiguous_format)
    return small_cpu, {"flops_before": flops_before, "flops_after": count_flops(small_cpu, example),
                       "params_before": params_before, "params_after": count_params(small_cpu),
                       "accuracy_trained": accuracy_trained, "accuracy_pruned": accuracy_pruned,
                       "picture": picture.name if picture is not None else None, "controller_data": share}
