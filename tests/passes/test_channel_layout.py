"""passes/channel_layout.py: reshape_groups and the ChannelLayout helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from atofx.passes.channel_layout import ChannelLayout, concat, reshape_groups
from hypothesis import given
from hypothesis import strategies as st


def layout(ids: list[int], zero: list[bool] | None = None, dim: int = 1) -> ChannelLayout:
    zero = [True] * len(ids) if zero is None else zero
    return ChannelLayout(dim, np.asarray(ids, dtype=np.int64), np.asarray(zero, dtype=bool))


# ---------------------------------------------------------------- ChannelLayout


def test_width_and_at() -> None:
    lay = layout([5, 6, 7])
    assert lay.width == 3
    moved = lay.at(3)
    assert moved.dim == 3 and moved.ids is lay.ids and lay.dim == 1  # frozen: `at` returns a new layout


def test_sliced_keeps_ids_and_zero_together() -> None:
    lay = layout([0, 1, 2, 3, 4, 5], [True, False, True, False, True, False])
    part = lay.sliced(slice(1, 5, 2))
    assert part.ids.tolist() == [1, 3] and part.zero.tolist() == [False, False] and part.dim == 1
    picked = lay.sliced(np.array([4, 0]))
    assert picked.ids.tolist() == [4, 0] and picked.zero.tolist() == [True, True]


def test_with_zero_broadcasts_and_copies() -> None:
    lay = layout([0, 1, 2], [True, False, True])
    none = lay.with_zero(False)
    assert none.zero.tolist() == [False] * 3 and lay.zero.tolist() == [True, False, True]
    none.zero[0] = True  # a private copy, not a read-only broadcast view
    assert lay.zero[0]
    mixed = lay.with_zero(np.array([False, True, True]))
    assert mixed.zero.tolist() == [False, True, True] and mixed.ids is lay.ids


def test_concat_in_order() -> None:
    out = concat([layout([3, 4], [True, False]), layout([9], [True])], dim=2)
    assert out.dim == 2 and out.ids.tolist() == [3, 4, 9] and out.zero.tolist() == [True, False, True]


# ---------------------------------------------------------------- reshape_groups


@pytest.mark.parametrize(("src", "dst", "expected"), [
    ((2, 8, 3, 4), (2, 96), [((0,), (0,)), ((1, 2, 3), (1,))]),  # flatten(1)
    ((2, 8, 3, 4), (2, 2, 4, 3, 4), [((0,), (0,)), ((1,), (1, 2)), ((2,), (3,)), ((3,), (4,))]),  # split channels
    ((2, 4, 2, 3, 4), (2, 8, 3, 4), [((0,), (0,)), ((1, 2), (1,)), ((3,), (2,)), ((4,), (3,))]),  # merge after shuffle
    ((2, 8, 1, 1), (2, 8), [((0,), (0,)), ((1, 2, 3), (1,))]),  # squeeze: trailing 1s join the channel group
    ((2, 8), (2, 8, 1, 1), [((0,), (0,)), ((1,), (1, 2, 3))]),  # unsqueeze
    ((1, 8, 6), (8, 6), [((0, 1), (0,)), ((2,), (1,))]),  # leading 1 squeezed away
    ((2, 8), (2, 1, 8), [((0,), (0, 1)), ((1,), (2,))]),  # unsqueeze(1): the new dim joins the batch group
    ((6, 4), (4, 6), [((0, 1), (0, 1))]),  # no common boundary inside
    ((2, 3), (2, 3), [((0,), (0,)), ((1,), (1,))]),
])
def test_reshape_groups_examples(src: tuple, dst: tuple, expected: list) -> None:
    groups = reshape_groups(src, dst)
    assert [(tuple(i), tuple(o)) for i, o in groups] == expected


@pytest.mark.parametrize(("src", "dst"), [((2, 8), (2, 7)), ((6,), (4,)), ((2, 3), (7,))])
def test_reshape_groups_rejects_different_sizes(src: tuple, dst: tuple) -> None:
    assert reshape_groups(src, dst) is None


def _factorisations(draw: st.DrawFn, total: int) -> tuple[int, ...]:
    dims = []
    while total > 1:
        divisors = [d for d in range(2, total + 1) if total % d == 0]
        d = draw(st.sampled_from(divisors))
        dims.append(d)
        total //= d
    if draw(st.booleans()):
        dims.insert(draw(st.integers(0, len(dims))), 1)
    return tuple(dims) or (1,)


@st.composite
def reshapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    total = draw(st.sampled_from([1, 2, 6, 8, 12, 24, 36, 48, 72]))
    return _factorisations(draw, total), _factorisations(draw, total)


@given(reshapes())
def test_reshape_groups_partition_both_shapes(pair: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    """Groups are contiguous runs that cover every dim once, in order, with equal products."""
    src, dst = pair
    groups = reshape_groups(src, dst)
    assert groups is not None
    ins = [d for i, _ in groups for d in i]
    outs = [d for _, o in groups for d in o]
    assert ins == list(range(len(src))) and outs == list(range(len(dst)))
    for i, o in groups:
        assert math.prod(src[d] for d in i) == math.prod(dst[d] for d in o)
    # a group boundary is a boundary of a real reshape: the flat index splits the same way on both sides
    for i, o in groups:
        if i and o:
            assert math.prod(src[i.start:]) == math.prod(dst[o.start:])
