"""benchmarks/macs_check.py, the executed-MACs check of issue 11, on the demo model (fast):
its own count from ORT's shapes agrees with the report, and a wrong report figure is flagged."""

from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo.onnx"


@pytest.fixture(scope="module")
def macs_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import macs_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return macs_check


def test_report_macs_match_the_executed_ones(macs_check) -> None:
    row = macs_check.check_model(DEMO, 0.5, macs_check.TOLERANCE)
    assert row["status"] == "ok", row
    assert row["exec_before"] > row["exec_after"] > 0  # something was counted, and pruning removed MACs
    assert row["diff_before"] <= macs_check.TOLERANCE and row["diff_after"] <= macs_check.TOLERANCE


def test_a_wrong_figure_is_flagged(macs_check, monkeypatch: pytest.MonkeyPatch) -> None:
    from spa.report import Report

    real = Report.__init__

    def inflated(self, *a, **kw):
        real(self, *a, **kw)
        self.macs_after = int(self.macs_after * 1.05)

    monkeypatch.setattr(Report, "__init__", inflated)
    row = macs_check.check_model(DEMO, 0.5, macs_check.TOLERANCE)
    assert row["status"] == "OFF" and row["diff_after"] > macs_check.TOLERANCE


def test_formulas_against_spa_executed_count(macs_check) -> None:
    """Two independent counts from ORT's shapes (this benchmark's and spa.analysis.cost's)."""
    from spa.analysis.cost import executed_macs

    feeds = macs_check._feeds(DEMO)
    assert macs_check.executed_macs(DEMO, feeds)["macs"] == executed_macs(DEMO, feeds)
