"""``autonorm recommend``: norm choices for a model class, with their reasons, written as a
config."""

from __future__ import annotations

import autonorm


def test_recommend_prints_choices_with_reasons_and_writes_the_config(workdir, installed_cli):
    result = installed_cli(
        ["recommend", "usermodels.Net", "--batch-size", "2", "-o", "rec.yaml"], workdir
    )
    assert result.returncode == 0, result.stderr
    assert "why" in result.stdout and "GroupNorm" in result.stdout
    config = autonorm.NormConfig.load(workdir / "rec.yaml")
    assert config["bn"].name == "groupnorm" and config["norm"].name == "layernorm"
    assert set(config.metadata["reasons"]) == {"bn", "norm"}


def test_recommend_for_the_slots_that_include_and_exclude_select(workdir, installed_cli):
    result = installed_cli(
        ["recommend", "usermodels.Net", "--batch-size", "2", "--include", "b*", "-o", "in.yaml"],
        workdir,
    )
    assert result.returncode == 0, result.stderr
    assert set(autonorm.NormConfig.load(workdir / "in.yaml").choices) == {"bn"}
    result = installed_cli(
        ["recommend", "usermodels.Net", "--exclude", "bn", "x*", "-o", "ex.yaml"], workdir
    )
    assert result.returncode == 0, result.stderr
    assert set(autonorm.NormConfig.load(workdir / "ex.yaml").choices) == {"norm"}


def test_recommend_refuses_patterns_that_select_no_slot(workdir, installed_cli):
    result = installed_cli(["recommend", "usermodels.Net", "--include", "nothing*"], workdir)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("autonorm: error: no slot of Net is selected by --include nothing*:")
