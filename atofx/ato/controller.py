"""The ATO controller network: one binary keep-mask per prunable channel space.

Fixed orthogonal embeddings (one per space) run through a bidirectional GRU, so every space's
mask sees the whole network; a Linear head per space emits one logit per ZIG. Gumbel-Sigmoid with
a straight-through threshold gives binary masks in the forward pass and the soft gradient in the
backward pass. The noise is logistic (the difference of two Gumbels, a true Gumbel-Sigmoid) or, as in
the authors' released code, a single Gumbel (`noise="gumbel"`, biased towards keeping by its mean 0.58).
Masks are dicts keyed by space index (`ChannelSpace.index`), the key the FLOPs model
(`FlopsModel(keep)`) and the projections (`ZIGParams.keep_vector`) take.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from atofx.passes.zig_inference import ZIGSet

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
            raise ValueError(f"Controller needs at least one space, each of width >= 1; got widths={list(widths)}.")
        keys = list(range(len(widths))) if keys is None else list(keys)
        if len(keys) != len(widths) or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be {len(widths)} distinct space indices; got {keys}.")
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
