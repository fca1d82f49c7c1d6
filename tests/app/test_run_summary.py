"""app/run_summary.py: the table a finished `atofx train` run prints (the folder checks: test_report_command.py)."""

from __future__ import annotations

from atofx.app.run_summary import summary_table


def test_the_summary_table_prints_flops_and_macs_and_a_dash_without_a_dense_reference():
    summary = {"model": "m", "dataset": "d", "epochs": 1, "target_flops": 0.5, "seconds": 1.0, "flops_before": 4e6,
               "flops_after": 2e6, "params_before": 1e3, "params_after": 5e2, "flops_kept": 0.5,
               "accuracy_dense": None, "accuracy_trained": 50.0, "accuracy_pruned": 50.0}
    table = summary_table(summary)
    assert "MMACs" in table and "4.00    2.00" in table and "2.00    1.00" in table
    assert table.splitlines()[3].split()[:2] == ["dense", "-"]
