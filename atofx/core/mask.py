"""Mask: one keep-bit per ZIG of every prunable channel space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atofx.errors import MaskError
from atofx.passes.zig_inference import ZIGSet


def rounded_count(n: int, width: int, multiple: int) -> int:
    """`n` kept ZIGs of a space of `width`, moved to the nearest multiple of `multiple` (at least one) or to the
    whole width (ties go down, to stay within a budget); a space no wider than `multiple` keeps `n`.

    Convolutions run fastest at widths the kernels block by (oneDNN: 8 or 16 channels; tensor cores: 8).
    """
    if multiple <= 1 or width <= multiple:
        return n
    options = [*range(multiple, width + 1, multiple), width]
    return min(options, key=lambda k: (abs(k - n), k))


def keep_at_least(bits: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """`bits` (0/1 floats or bools) with the `n` best-scored positions kept too: a space's cap on pruning."""
    if int(bits.sum()) >= n:
        return bits
    out = bits.clone()
    out[scores.topk(min(n, len(scores))).indices] = 1
    return out


@dataclass
class Mask:
    """`bits[space.index]` is a bool vector of the space's width; True keeps the channel.

    Build one by hand with a vector per prunable space (`{s.index: torch.ones(s.width, dtype=torch.bool) for s
    in ato.zigs.prunable}`, then clear the bits to drop), or from importance scores with `Mask.from_scores`.
    """

    bits: dict[int, torch.Tensor]

    @classmethod
    def ones(cls, zigs: ZIGSet) -> Mask:
        return cls({s.index: torch.ones(s.width, dtype=torch.bool) for s in zigs.prunable})

    @classmethod
    def random(cls, zigs: ZIGSet, keep: float, seed: int = 0, round_to: int = 1) -> Mask:
        """Keep round(keep * width) random channels of every space, at least one (with `round_to`, that count
        moved to a multiple of it: `rounded_count`)."""
        if not 0.0 < keep <= 1.0:
            raise MaskError(f"keep must be in (0, 1], got {keep}.")
        gen = torch.Generator().manual_seed(seed)
        bits = {}
        for s in zigs.prunable:
            n = rounded_count(max(1, round(keep * s.width)), s.width, round_to)
            b = torch.zeros(s.width, dtype=torch.bool)
            b[torch.randperm(s.width, generator=gen)[:n]] = True
            bits[s.index] = b
        return cls(bits)

    @classmethod
    def from_scores(cls, zigs: ZIGSet, scores: dict[int, torch.Tensor], keep: float, round_to: int = 1) -> Mask:
        """Keep the round(keep * width) best-scored ZIGs of every prunable space (at least one; with `round_to`, a
        multiple of it). `scores[space.index]` holds one importance per ZIG, e.g. `ato.group_norms()` (L2 norm of
        each ZIG's parameters) or your own criterion; spaces without scores keep every channel."""
        if not 0.0 < keep <= 1.0:
            raise MaskError(f"keep must be in (0, 1], got {keep}.")
        bits = {}
        for s in zigs.prunable:
            b = torch.ones(s.width, dtype=torch.bool)
            if s.index in scores:
                score = torch.as_tensor(scores[s.index]).detach().cpu().flatten()
                if score.shape != (s.width,):
                    raise MaskError(f"scores for space {s.index} ({s.name}) have shape {tuple(score.shape)}, "
                                    f"the space has width {s.width}.")
                n = rounded_count(max(1, round(keep * s.width)), s.width, round_to)
                b = torch.zeros(s.width, dtype=torch.bool)
                b[score.topk(n).indices] = True
            bits[s.index] = b
        return cls(bits)

    def validate(self, zigs: ZIGSet) -> None:
        """Raise MaskError unless every prunable space has a non-empty vector of its width."""
        for s in zigs.prunable:
            b = self.bits.get(s.index)
            if b is None:
                raise MaskError(f"the mask has no bits for space {s.index} ({s.name}); build it with ato.random_mask "
                                "or Mask.ones(ato.zigs).")
            if b.shape != (s.width,):
                raise MaskError(f"space {s.index} ({s.name}) has width {s.width}, the mask gives {tuple(b.shape)}.")
            if not bool(b.any()):
                raise MaskError(f"the mask drops every channel of space {s.index} ({s.name}); keep at least one.")
        extra = set(self.bits) - {s.index for s in zigs.prunable}
        if extra:
            raise MaskError(f"the mask names spaces {sorted(extra)} that are pinned or do not exist.")

    def component_keep(self, zigs: ZIGSet) -> np.ndarray:
        """One bool per ZIG id, True for pinned ZIGs."""
        return zigs.keep_per_component({i: b.detach().cpu().numpy().astype(bool) for i, b in self.bits.items()})

    def as_float(self, dtype: torch.dtype = torch.float64) -> dict[int, torch.Tensor]:
        return {i: b.to(dtype) for i, b in self.bits.items()}

    def kept_fraction(self) -> float:
        total = sum(b.numel() for b in self.bits.values())
        return sum(int(b.sum()) for b in self.bits.values()) / max(total, 1)
