"""`ato.report()`: one row per channel space, pinned rows carry their reason, unknown ops are listed."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import atofx
from atofx.core.report import format_table, space_records


class Flip(nn.Module):
    """An op outside the rule table: reverses the channel order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[1])


class Net(nn.Module):
    """conv-BN-ReLU, a residual add, an unknown op on channels, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.flip, self.c4 = nn.Conv2d(8, 6, 1), Flip(), nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = x + self.c2(x)
        x = self.c4(self.flip(self.c3(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def ato() -> atofx.ATOModel:
    torch.manual_seed(0)
    return atofx.compile(Net(), torch.randn(2, 3, 8, 8))


def _table_rows(report: str) -> list[str]:
    lines = report.splitlines()
    assert set(lines[1]) <= {"-", " "}, "second line is the rule under the header"
    return [line for line in lines[2:] if re.match(r"\d+  ", line)]  # the summary reads "N channel spaces"


def test_one_row_per_space(ato):
    rows = _table_rows(ato.report())
    assert len(rows) == len(ato.spaces)
    for row, space in zip(rows, ato.spaces, strict=True):
        assert row.split()[:3] == [str(space.index), space.name, str(space.width)]


def test_pinned_rows_give_the_reason(ato):
    rows = _table_rows(ato.report())
    pinned = [s for s in ato.spaces if s.pinned]
    assert pinned and len(pinned) < len(ato.spaces)
    for row, space in zip(rows, ato.spaces, strict=True):
        if space.pinned:
            assert space.reason and row.endswith(f"pinned: {space.reason}")
        else:
            assert row.endswith("prunable")
    reasons = " ".join(s.reason for s in pinned)
    assert "model input" in reasons and "model output" in reasons and "torch.flip" in reasons


def test_summary_counts_and_unknown_ops(ato):
    report = ato.report()
    n_prunable = len(ato.zigs.prunable)
    assert f"{len(ato.spaces)} channel spaces, {n_prunable} prunable" in report
    assert f"({sum(s.width for s in ato.zigs.prunable)} ZIGs)" in report
    assert "ops outside the rule table" in report and "torch.flip" in report.splitlines()[-1]


def test_space_records_match_the_spaces(ato):
    records = space_records(ato)
    assert [r["name"] for r in records] == [s.name for s in ato.spaces]
    assert all(0.0 <= r["flops_share"] <= 1.0 for r in records)
    assert [r["reason"] for r in records if r["pinned"]] == [s.reason for s in ato.spaces if s.pinned]


def test_leaf_module_is_pinned_by_name():
    torch.manual_seed(0)
    ato = atofx.compile(Net(), torch.randn(2, 3, 8, 8), leaf_modules=[Flip])
    assert any(s.pinned and "Flip" in s.reason for s in ato.spaces)
    assert "Flip" in ato.report()


class RootScale(nn.Module):
    """conv, BN, then a `(1, C, 1, 1)` parameter of the model itself (its module path is "")."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b, self.d = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.w = nn.Parameter(torch.randn(5, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(self.d(self.b(self.c(x)) * self.scale), self.w)


def test_a_parameter_of_the_model_itself_is_named_not_left_empty():
    torch.manual_seed(0)
    ato = atofx.compile(RootScale(), torch.randn(1, 3, 8, 8))
    records = {r["name"]: r for r in space_records(ato)}
    assert records["c"]["producers"] == ["c", "b", "scale"]
    assert records["d"]["consumers"] == ["w"]
    rows = _table_rows(ato.report())
    assert any(row.split()[:6] == ["1", "c", "8", "c,", "b,", "scale"] for row in rows), rows
    assert not any(re.search(r", ( |$)|,,", row) for row in rows), rows


def test_format_table_aligns_columns():
    text = format_table(["a", "long header"], [[1, "x"], ["wide cell", 2]])
    lines = text.splitlines()
    assert lines[0] == "a          long header"
    assert lines[1] == "---------  -----------"
    assert lines[2] == "1          x"
    assert lines[3].index("2") == lines[0].index("long")


def test_flops_are_twice_the_macs_and_both_are_printed(ato):
    import torchvision

    x = torch.randn(1, 3, 224, 224)
    model = torchvision.models.resnet18()
    assert atofx.count_flops(model, x) == 2 * atofx.count_macs(model, x) == 3_628_146_688  # TP: 1.82 G MACs
    assert f"= {ato.flops_model.total / 2e6:.1f} M MACs (FLOPs = 2 x MACs" in ato.report()
