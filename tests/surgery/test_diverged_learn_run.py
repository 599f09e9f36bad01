"""A diverged learn run (NaN/inf mixing weights) is refused with its slots named: by
``derive_config``, at the end of an ``AutoNorm`` learn run, and in the search's learn warm
start."""

from __future__ import annotations

import pytest
import torch

import autonorm
from autonorm import AutoNormError
from autonorm.callbacks import AutoNorm
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer


def test_derive_config_refuses_nan_mixing_weights_and_names_the_slots():
    model = autonorm.to_switchable(TinyConvNet())
    with torch.no_grad():
        model.bn2.mean_weight[0] = float("nan")
        model.head_norm.var_weight.fill_(float("inf"))
    with pytest.raises(AutoNormError, match=r"not finite.*'bn2', 'head_norm'") as err:
        autonorm.derive_config(model)
    assert "'bn1'" not in str(err.value)


def test_a_diverged_learn_run_fails_with_the_slots_named(tmp_path):
    callback = AutoNorm(mode="learn", config_path=tmp_path / "learned.yaml")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    with pytest.raises(AutoNormError, match=r"learn run diverged.*'bn1'"):
        trainer.fit(TinyConvNet(fail_with="nan"), datamodule=TinyDataModule())
    assert not (tmp_path / "learned.yaml").exists()


def test_warm_start_learn_on_a_diverging_model_fails_with_that_error(tmp_path):
    with pytest.raises(AutoNormError, match="learn run diverged"):
        autonorm.search(
            lambda: TinyConvNet(fail_with="nan"),
            TinyDataModule(),
            n_trials=1,
            space="minimal",
            trainer_kwargs={"max_epochs": 1},
            out_dir=tmp_path / "out",
            warm_start="learn",
            seed=0,
        )
