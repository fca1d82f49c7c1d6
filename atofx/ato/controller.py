"""The ATO controller: its network (one binary keep-mask per prunable channel space), the spaces it gates
(`gated_spaces`) and the data it learns from (`controller_subset`, D_CN).

Fixed orthogonal embeddings (one per space) run through a bidirectional GRU, so every space's
mask sees the whole network; a Linear head per space emits one logit per ZIG. Gumbel-Sigmoid with
a straight-through threshold gives binary masks in the forward pass and the soft gradient in the
backward pass. The noise is logistic (the difference of two Gumbels, a true Gumbel-Sigmoid) or, as in
the authors' released code, a single Gumbel (`noise="gumbel"`, biased towards keeping by its mean 0.58).
Masks are dicts keyed by space index (`ChannelSpace.index`), the key the FLOPs model
(`FlopsModel(keep)`) and the projections (`ZIGParams.keep_vector`) take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from atofx.ato import distributed
from atofx.errors import ConfigError
from atofx.passes.zig_inference import ZIGSet

if TYPE_CHECKING:
    from atofx.core.analysis import Analysis

EMBED_DIM = 64
HIDDEN = 128

Masks = dict[int, Tensor]


def _gumbel(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise -log(-log U); drawn on the generator's device, then moved."""
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7))).to(device)


class Controller(nn.Module):
    """Maps fixed per-space embeddings to per-ZIG logits (Bi-GRU 64 -> 2x128, LayerNorm, ReLU, heads).

    `widths[i]` is the number of ZIGs of the space `keys[i]` (default `keys = range(len(widths))`);
    the GRU runs over the spaces in that order. `seed` makes the embeddings and the initial
    weights deterministic without touching the global RNG. `head_bias=False`: heads without bias, as in the
    authors' code.
    """

    def __init__(self, widths: Sequence[int], keys: Sequence[int] | None = None, seed: int = 0,
                 head_bias: bool = True):
        super().__init__()
        if not widths or any(w < 1 for w in widths):
            raise ConfigError(f"Controller needs at least one space, each of width >= 1; got widths={list(widths)}.")
        keys = list(range(len(widths))) if keys is None else list(keys)
        if len(keys) != len(widths) or len(set(keys)) != len(keys):
            raise ConfigError(f"keys must be {len(widths)} distinct space indices; got {keys}.")
        self.keys: list[int] = keys
        self.widths: list[int] = [int(w) for w in widths]
        gen = torch.Generator().manual_seed(seed)
        emb = torch.empty(len(widths), 1, EMBED_DIM)  # (sequence, batch=1, features) for the GRU
        nn.init.orthogonal_(emb, generator=gen)
        self.register_buffer("embeddings", emb)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.gru = nn.GRU(EMBED_DIM, HIDDEN, bidirectional=True)
            self.norm = nn.LayerNorm(2 * HIDDEN)
            self.heads = nn.ModuleList(nn.Linear(2 * HIDDEN, w, bias=head_bias) for w in self.widths)

    @classmethod
    def from_zigs(cls, zigs: ZIGSet, seed: int = 0, spaces: Sequence[int] | None = None,
                  head_bias: bool = True) -> Controller:
        """A controller over the prunable spaces of `zigs` (or the listed space indices), in graph order."""
        chosen = [s for s in zigs.prunable if spaces is None or s.index in spaces]
        return cls([s.width for s in chosen], [s.index for s in chosen], seed=seed, head_bias=head_bias)

    def forward(self) -> Masks:
        """Logits, one tensor of shape (width,) per space key."""
        out, _ = self.gru(self.embeddings)
        h = torch.relu(self.norm(out[:, 0]))
        return {k: head(h[i]) for i, (k, head) in enumerate(zip(self.keys, self.heads, strict=True))}

    def sample(
        self, hard: bool = True, tau: float = 0.4, offset: float = 3.0, generator: torch.Generator | None = None,
        noise: str = "logistic",
    ) -> Masks:
        """Gumbel-Sigmoid masks sigmoid((logits + offset + g) / tau), for training.

        `noise`: "logistic" draws g = g1 - g2 (two Gumbels); "gumbel" draws one Gumbel, as the authors' code
        does. With `hard`, the forward value is the binary threshold at 0.5 and the gradient is the soft
        value's (straight-through). The offset makes a fresh controller keep almost every ZIG.
        """
        logits = torch.cat(list(self.forward().values()))  # all spaces at once: one draw, one threshold
        g = _gumbel(logits.shape, logits.device, generator)
        if noise == "logistic":
            g = g - _gumbel(logits.shape, logits.device, generator)
        soft = torch.sigmoid((logits + offset + g) / tau)
        # hard + (soft - soft) is exactly binary forward, soft's gradient backward
        masks = (soft > 0.5).to(soft.dtype) + (soft - soft.detach()) if hard else soft
        return dict(zip(self.keys, masks.split(self.widths), strict=True))

    @torch.no_grad()
    def mask(self, offset: float = 3.0) -> Masks:
        """Deterministic binary masks (no noise): 1 where logits + offset > 0; for eval and freezing."""
        return {k: (logits + offset > 0).to(logits.dtype) for k, logits in self.forward().items()}

    def optimizer(self, kind: str, lr: float) -> torch.optim.Optimizer:
        """"adam": Adam; "adamw": AdamW with weight decay 1e-2 on the weights only (the authors' `group_weight`).

        The fused kernel where torch has one: the controller has ~35 small tensors, and Adam's loop over them
        cost more than their update (ResNet-20: 1.4 ms a step, fused 0.3 ms).
        """
        fused = next(self.parameters()).device.type in ("cpu", "cuda")
        if kind == "adam":
            return torch.optim.Adam(self.parameters(), lr=lr, fused=fused)
        decay = [p for p in self.parameters() if p.ndim > 1]
        rest = [p for p in self.parameters() if p.ndim <= 1]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 1e-2}, {"params": rest, "weight_decay": 0.0}],
                                 lr=lr, fused=fused)


def gated_spaces(analysis: Analysis, search_space: str) -> list[int]:
    """The indices of the spaces the controller gates: every prunable one ("all"), or those inside one block.

    A space is block-internal when all its producers and consumers lie inside one module that is a block
    (a module with submodules, other than the model itself and the containers Sequential/ModuleList/ModuleDict;
    the innermost such module around them decides): a ResNet block's conv1 -> conv2 channels, a MobileNetV2
    block's expanded width. Residual streams, the stem and the head span several blocks and are not gated:
    the authors' code gates the block-internal spaces only.
    """
    prunable = analysis.zigs.prunable
    if search_space == "all":
        return [s.index for s in prunable]
    modules = dict(analysis.model.named_modules())
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

    def internal(space: Any) -> bool:
        names = [n.split(".") for n in (*space.producers, *space.consumers)]
        common: list[str] = []
        for parts in zip(*names, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        while common:  # the innermost block around them; a layer called twice is no block
            module = modules.get(".".join(common))
            if module is not None and not isinstance(module, containers) and next(module.children(), None):
                return True
            common.pop()
        return False

    chosen = [s.index for s in prunable if internal(s)]
    if not chosen:
        raise ConfigError("search_space 'internal' found no channel space inside a block (residual or inverted-"
                          "residual block module) in this model; use search_space='all' (--search-space all).")
    return chosen


def subset_size(n: int, share: float, batch: int) -> int:
    """The size of D_CN, `share` of `n` images; beyond one batch, rounded to whole batches (`controller_subset`)."""
    size = max(1, math.ceil(share * n))
    return min(n, round(size / batch) * batch) if size > batch else size


def controller_batches(n: int, share: float, batch: int, ranks: int) -> int:
    """The controller's batches a pass over D_CN, on each of `ranks` processes (each takes its shard)."""
    return max(1, math.ceil(math.ceil(subset_size(n, share, batch) / ranks) / batch))


def controller_subset(loader: DataLoader, share: float, seed: int) -> DataLoader:
    """D_CN: a fixed random `share` of the training set, same batch size and collate as `loader`.

    Beyond one batch, its size is rounded to whole batches: a remainder batch of a few samples would cost
    a full controller step (a masked forward and backward) for a noisy gradient. Under torchrun each rank
    draws the same subset and takes its shard of it.
    """
    dataset = loader.dataset
    n = len(dataset)
    batch = loader.batch_size or 1
    size = subset_size(n, share, batch)
    gen = torch.Generator().manual_seed(seed + 1)
    subset = Subset(dataset, torch.randperm(n, generator=gen)[:size].tolist())
    if distributed.current().parallel:
        return DataLoader(subset, batch_size=batch, collate_fn=loader.collate_fn,
                          sampler=distributed.training_sampler(subset, seed + 2))
    return DataLoader(subset, batch_size=batch, shuffle=True,
                      collate_fn=loader.collate_fn, generator=torch.Generator().manual_seed(seed + 2))
