"""The epoch loop of an ATO run (`fit`): target-model steps with projections, the controller's passes, logging,
checkpoints and resuming; and `evaluate`."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from atofx.ato import checkpoint as ckpt
from atofx.ato import distributed
from atofx.ato.batches import check_targets, checked_forward, hits, loader_length, split_batch, to_device
from atofx.ato.controller import controller_subset
from atofx.ato.denormals import flush_denormal_state_
from atofx.ato.lr_schedule import when_to_step
from atofx.ato.mixed_precision import StepPrecision
from atofx.ato.trainer import ATOTrainer
from atofx.errors import AtofxError, DataError
from atofx.passes.values import evaluating


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The random generators a loader draws its order from (its own and its sampler's), without repeats."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             loss_fn: Callable[[Any, Tensor], Tensor], example_inputs: tuple | None = None) -> dict[str, float]:
    """Mean loss and top-1 accuracy (%) in eval mode; the first batch is checked against `example_inputs`.

    A loader sharded across torchrun's ranks is evaluated by all of them together.
    """
    total, correct, loss_sum = 0, torch.zeros((), device=device), torch.zeros((), device=device)
    with evaluating(model):
        for step, batch in enumerate(loader):
            inputs, targets = split_batch(to_device(batch, device))
            if step == 0:
                out = checked_forward(model, inputs, example_inputs)
                check_targets(out, targets, loss_fn)  # eval mode: the output itself, no side effect to avoid
            else:
                out = model(*inputs)
            loss_sum += loss_fn(out, targets) * len(targets)
            correct += hits(out, targets)
            total += len(targets)
    if distributed.is_sharded(loader):
        loss_sum, correct, n = distributed.sum_across(loss_sum, correct, torch.tensor(float(total), device=device))
        total = int(n)
    if total == 0:
        raise DataError("the validation loader yielded no batch; check the dataset and batch_size/drop_last.")
    return {"loss": float(loss_sum) / total, "accuracy": 100.0 * float(correct) / total}


def train_one_epoch(trainer: ATOTrainer, loader: Iterable, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable[[Any, Tensor], Tensor], precision: StepPrecision | None = None,
                    progress: bool = False, desc: str = "", model: nn.Module | None = None,
                    scaler: torch.amp.GradScaler | None = None, batch_scheduler: Any = None) -> tuple[float, float]:
    """One pass of target-model steps, each followed by ATO's projection; returns (mean loss, accuracy %).

    `model` is what takes the steps (the DistributedDataParallel wrapper under torchrun); the figures returned
    are over all ranks. `scaler` is the run's GradScaler when `precision` is fp16 (fit makes one per run),
    `batch_scheduler` a scheduler that steps after every batch (`lr_schedule`). The loop itself never waits for
    the device, except for the progress bar on the CPU. At the end, the optimiser's denormal state is set to zero
    (`denormals`: stuck momentum of zeroed groups slows CPU steps).
    """
    device = trainer.device
    model = model if model is not None else trainer.model
    model.train()
    precision = precision or StepPrecision()
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    # disable=None: a bar on a terminal only; into a file or a pipe its updates would bury the epoch lines
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress else True)
    live_postfix = not bar.disable and device.type == "cpu"
    for step, batch in enumerate(bar):
        inputs, targets = split_batch(to_device(batch, device))
        inputs = precision.prepare_inputs(inputs)
        with precision.autocast(device):
            if step == 0:  # the first batch of each epoch is checked, before it can touch BatchNorm statistics
                check_targets(trainer.ato.example_output, targets, loss_fn)
                out = checked_forward(model, inputs, trainer.example_inputs)
            else:
                out = model(*inputs)
            loss = loss_fn(out, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        trainer.after_optimizer_step(optimizer)
        if batch_scheduler is not None:
            batch_scheduler.step()
        loss_sum += loss.detach() * len(targets)
        correct += hits(out, targets)
        seen += len(targets)
        if live_postfix and step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{100 * float(correct) / seen:.1f}",
                            flops=f"{trainer.flops_kept():.2f}")
    flush_denormal_state_(optimizer)
    loss_sum, correct, n = distributed.sum_across(loss_sum, correct, torch.tensor(float(seen), device=device))
    return float(loss_sum) / max(float(n), 1.0), 100.0 * float(correct) / max(float(n), 1.0)


def controller_epoch(trainer: ATOTrainer, cn_loader: Iterable, loss_fn: Callable[[Any, Tensor], Tensor],
                     train_batches: int | None = None) -> list[dict[str, float]]:
    """The controller's passes over D_CN for this epoch (nothing outside the window)."""
    steps: list[dict[str, float]] = []
    if trainer.in_window():
        window = trainer.phases.end - trainer.phases.start
        for _ in range(trainer.config.passes(window, len(cn_loader), train_batches)):
            steps.extend(trainer.controller_step(b, loss_fn) for b in cn_loader)
    return steps


def fit(
    trainer: ATOTrainer,
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Callable[[Any, Tensor], Tensor],
    val_loader: Iterable | None,
    checkpoint_dir: Path | None,
    log_path: Path | None,
    precision: StepPrecision,
    progress: bool,
) -> list[dict[str, Any]]:
    """Run (or resume) the whole schedule; returns one record per epoch.

    Under torchrun every rank calls this with its shard of the data; rank 0 alone writes the log and
    the checkpoints, and all ranks resume from the same checkpoint.
    """
    device, ph = trainer.device, trainer.phases
    distributed.require_sharded(train_loader, "training")
    progress = progress and distributed.current().main
    trainer.params.step_size(optimizer)  # an optimiser the projection cannot follow is refused before any epoch
    run = _Run(trainer, optimizer, scheduler, checkpoint_dir, log_path, loader_length(train_loader))
    if trainer.config.method == "ato" and not hasattr(train_loader, "dataset"):
        raise DataError(f"the training loader is a {type(train_loader).__name__}, not a DataLoader: ATO draws the "
                        "controller's subset (D_CN) from loader.dataset; wrap your data in a torch DataLoader.")
    cn_loader = controller_subset(train_loader, trainer.config.controller_data, trainer.config.seed) \
        if trainer.config.method == "ato" else None
    # the loaders' own generators decide the batch order: saved and restored so a resumed run is the same run
    run.generators = loader_generators(train_loader) + (loader_generators(cn_loader) if cn_loader is not None else [])
    run.scaler = precision.scaler(device)  # one for the run: its loss scale carries over from epoch to epoch
    run.resume()
    model = trainer.model
    precision.prepare_model(model)
    stepping = distributed.wrap(model, device)
    for epoch in range(trainer.state.epoch, ph.epochs):
        started = time.perf_counter()
        for loader in (train_loader, cn_loader):
            distributed.set_epoch(loader, epoch)
        before = {k: v.clone() for k, v in trainer.mask.items()}
        train_loss, train_acc = train_one_epoch(trainer, train_loader, optimizer, loss_fn, precision, progress,
                                                f"epoch {epoch + 1}/{ph.epochs}", stepping, run.scaler,
                                                scheduler if run.stepping == "batch" else None)
        distributed.share_buffers(model)  # rank 0's BN statistics everywhere: one model to evaluate and save
        if run.stepping == "epoch":
            scheduler.step()
        run.check_finite(train_loss, epoch)
        ctrl = controller_epoch(trainer, cn_loader, loss_fn, len(train_loader)) if cn_loader is not None else []
        record = _epoch_record(trainer, epoch, train_loss, train_acc, ctrl, before, optimizer)
        if val_loader is not None:
            val = evaluate(model, val_loader, device, loss_fn, trainer.example_inputs)
            record |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        if run.stepping == "metric":
            scheduler.step(record.get("val_loss", train_loss))
        record["seconds"] = time.perf_counter() - started
        trainer.state.history.append(record)
        if progress:
            tqdm.write(_epoch_line(record))
        run.save(record)
    return trainer.state.history


def _epoch_record(trainer: ATOTrainer, epoch: int, train_loss: float, train_acc: float, ctrl: list[dict[str, float]],
                  before: dict[int, Tensor], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Close the epoch (`trainer.end_epoch`) and describe it: one line of the log."""
    info = trainer.end_epoch(epoch)
    digests = distributed.agreed_mask_digests(trainer.mask, epoch + 1)
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "flops_kept": info["flops_kept"],
        "controller_loss": sum(c["controller_loss"] for c in ctrl) / len(ctrl) if ctrl else None,
        "mask_bits_changed": int(sum(int((trainer.mask[k] != before[k]).sum()) for k in before)),
        "mask_frozen": info["frozen"],
        "zigs_dropped": info["zigs_dropped"],
        "zigs_zero": info["zigs_zero"],
        "zigs_revived": info["zigs_revived"],
        "lr": float(optimizer.param_groups[0]["lr"]),
    }
    if distributed.current().parallel:
        record["mask_digests"] = digests  # one per rank, checked equal
    return record


class _Run:
    """What `fit` keeps on disk: the log and the checkpoints, written by rank 0, and resuming from them."""

    def __init__(self, trainer: ATOTrainer, optimizer: torch.optim.Optimizer, scheduler: Any,
                 checkpoint_dir: Path | None, log_path: Path | None, n_batches: int):
        self.trainer, self.optimizer, self.scheduler = trainer, optimizer, scheduler
        self.checkpoint_dir, self.log_path = checkpoint_dir, log_path
        self.fingerprint = trainer.fingerprint(n_batches)
        self.stepping = when_to_step(scheduler, trainer.phases.epochs, n_batches)  # a mis-sized OneCycleLR: refused
        self.generators: list[torch.Generator] = []
        self.scaler: torch.amp.GradScaler | None = None

    def resume(self) -> None:
        """Load the newest good checkpoint of this run, if any: weights, optimiser, mask, random streams; the log
        then holds the epochs resumed, none on a fresh start (not an earlier run's lines, appended to)."""
        saved, note = ckpt.read_latest(self.checkpoint_dir) if self.checkpoint_dir is not None else (None, None)
        if note:
            tqdm.write(f"atofx: {note}")
        if saved is not None:
            self._load(saved)
        if self.log_path is not None and distributed.current().main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.trainer.state.history))

    def _load(self, saved: dict[str, Any]) -> None:
        ckpt.check_compatible(saved, self.fingerprint, self.checkpoint_dir)
        self.trainer.load_state_dict(saved, self.optimizer, self.scheduler)
        if self.scaler is not None and saved.get("grad_scaler"):
            self.scaler.load_state_dict(saved["grad_scaler"])  # a fresh scale would re-learn its backoffs
        loader_rng = saved.get("loader_rng", [])
        if len(loader_rng) == len(self.generators):
            for g, state in zip(self.generators, loader_rng, strict=True):
                g.set_state(state)

    def check_finite(self, train_loss: float, epoch: int) -> None:
        """Stop a run whose loss diverged, naming the last good checkpoint."""
        if math.isfinite(train_loss):
            return
        last = self.checkpoint_dir / ckpt.CHECKPOINT if self.checkpoint_dir is not None else None
        raise AtofxError(
            f"the training loss became {train_loss} in epoch {epoch + 1}; training stopped. "
            + (f"The last good checkpoint is {last} (epoch {self.trainer.state.epoch}). " if last else "")
            + "Lower the learning rate or check the data."
        )

    def save(self, record: dict[str, Any]) -> None:
        """Append the epoch's record to the log and write the checkpoint (the state is gathered on every rank)."""
        payload = self.trainer.state_dict(self.optimizer, self.scheduler) if self.checkpoint_dir is not None else None
        if not distributed.current().main:
            return
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.checkpoint_dir is not None:
            scaler = self.scaler.state_dict() if self.scaler is not None else None
            ckpt.write(self.checkpoint_dir, payload | {"fingerprint": self.fingerprint, "grad_scaler": scaler,
                                                       "loader_rng": [g.get_state() for g in self.generators]})


def _epoch_line(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']:3d}", f"loss {r['train_loss']:.3f}", f"acc {r['train_accuracy']:.1f}%"]
    if "val_accuracy" in r:
        parts.append(f"val {r['val_accuracy']:.1f}%")
    parts.append(f"FLOPs kept {r['flops_kept']:.3f}")
    parts.append(f"ZIGs dropped/zero/revived {r['zigs_dropped']}/{r['zigs_zero']}/{r['zigs_revived']}")
    if r["controller_loss"] is not None:
        parts.append(f"ctrl {r['controller_loss']:.3f}")
    if r["mask_frozen"]:
        parts.append("mask frozen")
    return "  ".join(parts)
