"""Data-parallel runs under `torchrun`: the process group, sharded loaders, one mask on every rank.

Each rank trains the target model through DistributedDataParallel on its shard of the data. The
controller is trained on a shard of D_CN too, its gradients averaged across ranks, so its
parameters, and therefore the mask, stay identical everywhere; every epoch the ranks compare mask
digests and stop if they ever differ. Only rank 0 writes logs, checkpoints and results.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from atofx.errors import AtofxError, ConfigError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the run: its rank, the number of ranks, its GPU index on the node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def current() -> Ranks:
    """The process group's ranks; a single rank when no group is running."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank_zero() -> bool:
    """True outside torchrun and in its rank 0, whether or not the process group is up (torchrun's RANK): the
    process that speaks for all, also before `start` and after `stop`."""
    return int(os.environ.get("RANK", "0")) == 0


def start(device_type: str) -> Ranks:
    """Join torchrun's process group (nccl for CUDA, gloo for the CPU); a single rank outside torchrun."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun.")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return current()


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes the GPU of its local rank."""
    if device.type == "cuda" and device.index is None and current().parallel:
        return torch.device("cuda", current().local_rank)
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as its ranks train it: DistributedDataParallel when several ranks run, else itself."""
    if not current().parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_across(*values: Tensor) -> list[Tensor]:
    """Each value summed over the ranks (itself on one rank); one collective for all of them."""
    if not current().parallel:
        return list(values)
    flat = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values])
    dist.all_reduce(flat)
    return list(flat.unbind())


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks, so every rank takes the same step."""
    ranks = current()
    if not ranks.parallel:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ranks.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def share_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank; DDP syncs them only before each forward."""
    if current().parallel:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def gather_objects(obj: object) -> list:
    """`obj` from every rank, in rank order, on every rank; `[obj]` on a single rank."""
    ranks = current()
    if not ranks.parallel:
        return [obj]
    gathered: list = [None] * ranks.world
    dist.all_gather_object(gathered, obj)
    return gathered


def mask_digest(mask: dict[int, Tensor]) -> str:
    """A short digest of a mask's kept channels, equal exactly when the masks are."""
    h = hashlib.sha256()
    for k in sorted(mask):
        h.update(f"{k}:".encode())
        h.update(mask[k].detach().bool().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def agreed_mask_digests(mask: dict[int, Tensor], epoch: int) -> list[str]:
    """Every rank's mask digest; raises AtofxError if the ranks' masks differ (they must never)."""
    digests = gather_objects(mask_digest(mask))
    if len(set(digests)) > 1:
        raise AtofxError(
            f"after epoch {epoch} the ranks hold different masks (digests {', '.join(digests)}); this is a bug in "
            "atofx's data-parallel training, please report it with the command line.")
    return digests


def barrier() -> None:
    if current().parallel:
        dist.barrier()


class ShardSampler(Sampler[int]):
    """Every `world`-th index from `rank`, in order and without padding: evaluation counts each sample once."""

    def __init__(self, dataset: Dataset, ranks: Ranks):
        self.indices = range(ranks.rank, len(dataset), ranks.world)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def is_sharded(loader: object) -> bool:
    """True when `loader` gives each rank its own part of the data."""
    return isinstance(getattr(loader, "sampler", None), (DistributedSampler, ShardSampler))


def training_sampler(dataset: Dataset, seed: int) -> DistributedSampler:
    """The shuffled shard of this rank, the same permutation on every rank for a given epoch and seed."""
    ranks = current()
    return DistributedSampler(dataset, num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=seed)


def set_epoch(loader: object, epoch: int) -> None:
    """Tell a DistributedSampler which epoch it is, so each epoch shuffles anew (and a resume repeats it)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def require_sharded(loader: DataLoader | object, what: str) -> None:
    """Several ranks on an unsharded training loader would all see the same batches: refuse it."""
    if current().parallel and not is_sharded(loader):
        raise ConfigError(
            f"the {what} loader is not sharded across the {current().world} ranks: build it with "
            "sampler=torch.utils.data.distributed.DistributedSampler(dataset, seed=seed) (and no shuffle=True).")
