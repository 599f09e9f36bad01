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
