"""What a user writes as a norm choice: labels everywhere a choice goes, one-line errors for
unknown norms."""

from __future__ import annotations

import pytest
import torch

import autonorm
from autonorm.cli import main
from tests.models import resnet


def _search_args(choices: str) -> list[str]:
    return [
        "search", "--model", "tests.lightning_models.TinyConvNet",
        "--data", "tests.lightning_models.TinyDataModule", "--search.choices", choices,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("choices", "named"),
    [("[nonsense]", "'nonsense'"), ("nonsense", "'nonsense'"), ("[layernorm,fancy+ws]", "'fancy'")],
)
def test_unknown_norm_in_cli_choices_is_one_line_naming_it_and_the_valid_ones(
    capsys, choices, named
):
    assert main(_search_args(choices)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("autonorm: error: --search.choices: unknown norm " + named)
    assert "valid names are: batchnorm" in err and "rmsnorm" in err
    assert "NestedArg" not in err


def test_uniform_takes_a_label_and_adds_params_to_it():
    model, x = resnet()
    slots = autonorm.find_slots(model, x)
    config = autonorm.NormConfig.uniform(slots, "groupnorm+ws", groups=2)
    assert {c.label for c in config.choices.values()} == {"groupnorm(groups=2)+ws"}
    assert config == autonorm.NormConfig(dict.fromkeys(config.choices, "groupnorm(groups=2)+ws"))
    autonorm.apply_config(model, config)
    assert torch.isfinite(model(x)).all()
    with pytest.raises(ValueError, match="unknown norm 'groupnrom'; valid names are"):
        autonorm.NormConfig.uniform(slots, "groupnrom+ws")


def test_a_model_class_that_is_no_lightning_module_is_named_in_one_line(capsys):
    args = ["search", "--model", "tests.models.SmallResNet"]
    assert main([*args, "--data", "tests.lightning_models.TinyDataModule"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "autonorm: error: --model tests.models.SmallResNet is neither a LightningModule (of "
        "lightning.pytorch or pytorch_lightning) nor a config file"
    )
