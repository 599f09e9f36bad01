"""A study records what defines its experiment (the model's and the data's classes and init
arguments, the Trainer arguments that change training); a rerun with another one is refused in
one line naming what changed, never answered with the old study's best."""

from __future__ import annotations

import logging

import pytest

import autonorm
from autonorm import AutoNormError
from tests.lightning_models import TinyConvNet, TinyDataModule


class OtherData(TinyDataModule):
    """The same shapes, other data."""


def _search(tmp_path, model=TinyConvNet, data=None, trainer=None, **kwargs):
    return autonorm.search(
        model,
        data if data is not None else TinyDataModule(),
        n_trials=1,
        trainer_kwargs={"max_epochs": 1, **(trainer or {})},
        out_dir=tmp_path / "run",
        seed=0,
        space="minimal",
        warm_start=False,
        **kwargs,
    )


def test_a_rerun_with_other_data_a_model_argument_or_a_training_argument_is_refused(tmp_path):
    first = _search(tmp_path)
    experiment = first.study.user_attrs["autonorm"]["experiment"]
    assert experiment["data"]["class"].endswith("TinyDataModule")
    assert experiment["data"]["arguments"] == {"batch_size": 16, "n": 96}
    assert experiment["model"]["arguments"] == {"width": 8, "lr": 0.05, "fail_with": None}
    cases = [
        (
            {"data": OtherData()},
            r"data.class 'tests.lightning_models.TinyDataModule' -> .*OtherData'",
        ),
        ({"data": TinyDataModule(n=48)}, r"data.arguments.n 96 -> 48"),
        ({"model_kwargs": {"lr": 0.1}}, r"model.arguments.lr 0.05 -> 0.1"),
        ({"trainer": {"gradient_clip_val": 1.0}}, r"trainer.gradient_clip_val None -> 1.0"),
    ]
    for change, message in cases:
        with pytest.raises(AutoNormError, match=message) as caught:
            _search(tmp_path, **change)
        assert "\n" not in str(caught.value)
    # what does not change training (the progress bar) joins the study; nothing retrains
    again = _search(tmp_path, trainer={"enable_progress_bar": False})
    assert len(again.study.trials) == 1


def test_a_changed_budget_batch_size_on_the_same_datamodule_is_the_budgets_own_setting(tmp_path):
    data = TinyDataModule()
    _search(tmp_path, data=data, budget={"batch_size": 8})
    assert data.batch_size == 8  # the search set it on the user's object
    again = _search(tmp_path, data=data, budget={"batch_size": 8})  # the same experiment
    assert len(again.study.trials) == 1


def test_what_cannot_be_fingerprinted_is_said_once_when_the_study_is_made(tmp_path, caplog):
    data = TinyDataModule()
    data.setup()
    loaders = {
        "train_dataloaders": data.train_dataloader(),
        "val_dataloaders": data.val_dataloader(),
    }
    options = dict(
        n_trials=1,
        trainer_kwargs={"max_epochs": 1},
        out_dir=tmp_path / "run",
        space="minimal",
        warm_start=False,
        seed=0,
    )
    with caplog.at_level(logging.WARNING):
        first = autonorm.search(lambda: TinyConvNet(), **loaders, **options)
    said = [r.getMessage() for r in caplog.records if "cannot tell a rerun" in r.getMessage()]
    assert len(said) == 1 and "the dataloaders' contents" in said[0]
    assert first.study.user_attrs["autonorm"]["experiment"]["data"]["train"] == {
        "dataset": "TensorDataset",
        "samples": 96,
    }
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        autonorm.search(lambda: TinyConvNet(), **loaders, **options)  # joins: not said again
    assert not [r for r in caplog.records if "cannot tell a rerun" in r.getMessage()]
