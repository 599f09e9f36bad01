"""Fixtures of the command-line tests: one real search through the installed command, whose
bundle the search, report, show and dashboard tests read."""

from __future__ import annotations

import pytest

#: A small search on the user's classes (``usermodels.py`` in the ``workdir`` fixture).
SEARCH_ARGS = [
    "--model", "usermodels.Net",
    "--data", "usermodels.Data",
    "--trainer.max_epochs", "1",
    "--search.n_trials", "2",
    "--search.space", "minimal",
    "--search.seed", "0",
]  # fmt: skip


@pytest.fixture(scope="package")
def bundle(workdir, installed_cli):
    """One real search through the command, shared by the tests that read its bundle."""
    result = installed_cli(["search", *SEARCH_ARGS, "--search.out_dir", "out"], workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir / "out", result
