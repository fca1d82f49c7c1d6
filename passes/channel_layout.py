"""ChannelLayout: which zero-invariant element each channel position of a tensor belongs to.

Every tensor in the traced graph carries at most one tracked dim (its channel dim). Each
position along that dim is labelled with an *element id*; positions that must be removed
together end up in one connected component of elements, a ZIG. Several positions may carry
the same id (a flatten repeats a channel H*W times, a depthwise multiplier k times).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelLayout:
    """The tracked dim of one tensor: element id and zero-flag per position."""

    dim: int
    ids: np.ndarray
    zero: np.ndarray  # True: exactly zero once the parameters of this position's ZIG are zero

    @property
    def width(self) -> int:
        return int(self.ids.shape[0])

    def at(self, dim: int) -> ChannelLayout:
        return ChannelLayout(dim, self.ids, self.zero)

    def sliced(self, index: slice | np.ndarray) -> ChannelLayout:
        return ChannelLayout(self.dim, self.ids[index], self.zero[index])

    def with_zero(self, zero: np.ndarray | bool) -> ChannelLayout:
        if isinstance(zero, bool):
            return ChannelLayout(self.dim, self.ids, np.full(self.ids.shape, zero))
        return ChannelLayout(self.dim, self.ids, np.broadcast_to(np.asarray(zero, dtype=bool), self.ids.shape).copy())


def layouts_in(value: object) -> list[ChannelLayout]:
    """The layouts a node carries: its own, or those of the tensors in the tuple it returns."""
    if isinstance(value, ChannelLayout):
        return [value]
    if isinstance(value, (tuple, list)):
        return [x for x in value if isinstance(x, ChannelLayout)]
    return []


def concat(layouts: list[ChannelLayout], dim: int) -> ChannelLayout:
    return ChannelLayout(
        dim, np.concatenate([x.ids for x in layouts]), np.concatenate([x.zero for x in layouts])
    )


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[range, range]] | None:
    """Pair runs of dims of `src` and `dst` whose sizes multiply to the same number."""
    groups: list[tuple[range, range]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        i0, j0 = i, j
        a = src[i] if i < len(src) else 1
        b = dst[j] if j < len(dst) else 1
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                if i >= len(src):
                    return None
                a *= src[i]
                i += 1
            else:
                if j >= len(dst):
                    return None
                b *= dst[j]
                j += 1
        # absorb trailing size-1 dims into this group so groups stay contiguous
        while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            i += 1
        while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            j += 1
        groups.append((range(i0, min(i, len(src))), range(j0, min(j, len(dst)))))
    return groups
