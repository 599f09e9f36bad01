"""Fixtures of the report tests."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tests.report.studies import MIXED, make_study


@pytest.fixture
def mixed_study(tmp_path: Path) -> optuna.Study:
    """Seven trials: a baseline, one over the budget with a value, the best feasible one, a
    pruned one, one rejected at the start, a failed one, a complete one."""
    return make_study(tmp_path, MIXED)
