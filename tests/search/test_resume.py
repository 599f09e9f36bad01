"""Resuming and reusing a study safely: a rerun that changes what defines the study is
refused, a small batch is an infeasible trial, the batch size that really ran is recorded, a
partial config retrains as partial, a reused out_dir keeps no stale config, odd folder names
keep their own SQLite file. Real Lightning Trainers, real Optuna studies on SQLite."""

from __future__ import annotations

import logging

import optuna
import pytest
import pytorch_lightning as pl
import torch
from optuna.trial import TrialState
from torch import nn
from torch.utils.data import DataLoader

import autonorm
from autonorm import AutoNormError
from autonorm.search._storage import settings_differences, sqlite_url
from tests.lightning_models import TinyConvNet, TinyDataModule, synthetic_classification

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def quick(out, **kwargs):
    options = dict(
        n_trials=2, space="minimal", trainer_kwargs={"max_epochs": 1}, out_dir=out, seed=0,
        warm_start=False, study_name="s",
    )  # fmt: skip
    options.update(kwargs)
    model = options.pop("model", TinyConvNet)
    data = options.pop("data", TinyDataModule())
    return autonorm.search(model, data, **options)


class OtherNet(TinyConvNet):
    """Same slots, another model class."""


class PooledBatchNormNet(TinyConvNet):
    """Its head norm is a BatchNorm over (N, C): a batch of one sample cannot train it."""

    def __init__(self) -> None:
        super().__init__()
        self.head_norm = nn.BatchNorm1d(8)


def finished(study: optuna.Study) -> list:
    return [t for t in study.get_trials() if t.state in FINISHED]


# -- the settings that define a study -------------------------------------------------------------


def test_a_rerun_with_changed_settings_is_refused_naming_each_difference(tmp_path):
    quick(tmp_path, budget={"batch_size": 16})
    storage = sqlite_url(tmp_path)
    stored = optuna.load_study(study_name="s", storage=storage).user_attrs["autonorm"]
    with pytest.raises(AutoNormError) as err:
        quick(tmp_path, budget={"batch_size": 8}, monitor="train_loss")
    message = str(err.value)
    assert "\n" not in message
    assert (
        "budget.batch_size 16 -> 8" in message and "monitor 'val_loss' -> 'train_loss'" in message
    )
    assert "--search.study_name" in message and "out_dir" in message
    with pytest.raises(AutoNormError, match=r"model_class '.*TinyConvNet' -> '.*OtherNet'"):
        quick(tmp_path, budget={"batch_size": 16}, model=OtherNet)
    with pytest.raises(AutoNormError, match="max_epochs 1 -> 2"):
        quick(tmp_path, budget={"batch_size": 16}, trainer_kwargs={"max_epochs": 2})
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.user_attrs["autonorm"] == stored  # never overwritten
    assert len(finished(study)) == 2
    # more compute, another seed, a timeout: the same study, resumed
    result = quick(tmp_path, budget={"batch_size": 16, "trainings": 9}, n_trials=3, seed=5)
    assert len(finished(result.study)) == 3
    assert result.study.user_attrs["autonorm"]["budget"]["trainings"] == 9
    # asking for a new study in the same folder is how a changed search goes on
    other = quick(tmp_path, budget={"batch_size": 8}, study_name="s2")
    assert len(finished(other.study)) == 2


def test_a_study_started_without_a_budget_continues_with_more_compute(tmp_path):
    first = quick(tmp_path, n_trials=1)
    assert first.study.user_attrs["autonorm"]["budget"] is None
    more = quick(tmp_path, n_trials=None, budget={"trainings": 3})  # no budget = the default one
    assert len(finished(more.study)) > 1  # joined, and trained more
    assert more.summary["compute"]["trainings"] <= 3
    with pytest.raises(AutoNormError, match="budget.devices 1 -> 2"):  # a real change still is
        quick(tmp_path, budget={"devices": 2})


def test_settings_differences_ignore_added_compute_and_older_records():
    old = {"monitor": "val_loss", "budget": {"batch_size": 2, "trainings": 3}, "max_epochs": 3}
    assert settings_differences(old, {**old, "budget": {"batch_size": 2, "trainings": 8}}) == []
    assert settings_differences({"monitor": "a"}, {"monitor": "a", "space": {"x": 1}}) == []
    assert settings_differences(old, {**old, "warm_start": "learn"}) == []  # not recorded before
    assert settings_differences(
        {"slots": [{"name": "bn1"}, {"name": "bn2"}]}, {"slots": [{"name": "bn1"}]}
    ) == ["slots 2 -> 1 (['bn1'])"]


def test_a_staged_study_resumes_with_more_trials(tmp_path):
    first = quick(tmp_path, warm_start=True, n_trials=3)
    stages = [t.user_attrs.get("stage") for t in first.study.get_trials()]
    assert all(stages), stages
    again = quick(tmp_path, warm_start=True, n_trials=5)
    trials = again.study.get_trials()
    assert len(finished(again.study)) == 5
    assert [t.user_attrs.get("stage") for t in trials[:3]] == stages  # kept as they were
    assert all(t.user_attrs.get("stage") for t in trials)


# -- a batch too small for batch statistics --------------------------------------------------------


def test_a_batch_of_one_through_batchnorm_over_n_c_is_an_infeasible_trial(tmp_path):
    result = quick(
        tmp_path, model=PooledBatchNormNet, budget={"batch_size": 1}, warm_start=True, n_trials=3
    )
    trials = result.study.get_trials()
    assert not [t.number for t in trials if t.state == TrialState.FAIL]
    reasons = [t.user_attrs.get("infeasible_reason", "") for t in trials]
    assert any("Expected more than 1 value per channel" in r for r in reasons), reasons
    own = next(t for t in trials if t.user_attrs.get("baseline") == "own norms")
    assert own.user_attrs["feasible"] is False and own.state == TrialState.PRUNED
    assert (tmp_path / "report.html").is_file()
    # the steps that died mid-forward left no saved-tensor hook behind (torch.export and any
    # later training in the process would run through it)
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None


# -- the batch size that really ran ---------------------------------------------------------------


class HparamsData(pl.LightningDataModule):
    """Has a ``batch_size`` attribute, but its loaders read ``self.hparams.batch_size``."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size

    def train_dataloader(self):
        data = synthetic_classification(96, seed=0)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(synthetic_classification(48, seed=1), batch_size=32)


class FixedBatchData(HparamsData):
    """Ignores every batch size autonorm may set."""

    def train_dataloader(self):
        return DataLoader(synthetic_classification(96, seed=0), batch_size=16, drop_last=True)


def test_the_batch_size_a_trial_trained_at_is_recorded_and_hparams_are_set(tmp_path):
    result = quick(tmp_path, data=HparamsData(), budget={"batch_size": 4})
    sizes = [t.user_attrs.get("batch_size") for t in finished(result.study)]
    assert sizes == [4, 4]


def test_loaders_that_ignore_the_budget_batch_size_are_an_error_naming_both(tmp_path):
    with pytest.raises(AutoNormError, match=r"budget.batch_size=4 but .* holds 16 samples"):
        quick(tmp_path, data=FixedBatchData(), budget={"batch_size": 4})


class SmallData(HparamsData):
    """12 training samples, the last batch kept: fewer than one batch of 16."""

    def train_dataloader(self):
        return DataLoader(synthetic_classification(12, seed=0), batch_size=self.batch_size)


def test_a_dataset_smaller_than_the_budget_batch_is_no_mismatch(tmp_path):
    result = quick(tmp_path, data=SmallData(), budget={"batch_size": 16}, n_trials=1)
    assert finished(result.study)[0].user_attrs["batch_size"] == 12


# -- include + retrain ----------------------------------------------------------------------------


def test_retraining_a_partial_config_keeps_the_excluded_slots(tmp_path):
    result = quick(tmp_path, include="bn*", retrain=True)
    assert set(result.best_config.choices) == {"bn1", "bn2"}
    for name in ("best.ckpt", "report.html", "summary.json", "best_config.yaml"):
        assert (tmp_path / name).is_file(), name
    model = autonorm.load_from_checkpoint(TinyConvNet, tmp_path / "best.ckpt")
    assert type(model.head_norm) is nn.LayerNorm


# -- a reused out_dir -----------------------------------------------------------------------------


def test_a_study_without_feasible_trial_removes_the_other_studys_config(tmp_path, caplog):
    quick(tmp_path, study_name="a")
    assert (tmp_path / "best_config.yaml").is_file()
    with caplog.at_level(logging.WARNING, logger="autonorm.search._export"):
        result = quick(tmp_path, study_name="b", budget={"max_params": 1})
    assert result.best_config is None
    assert not (tmp_path / "best_config.yaml").exists()
    assert '"study_name": "b"' in (tmp_path / "summary.json").read_text()
    assert "held the bundle of study 'a'" in caplog.text


# -- odd folder names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["runs?1", "50%", "a%3Fb"])
def test_an_out_dir_with_url_characters_keeps_its_own_sqlite_file(tmp_path, name):
    out = tmp_path / name
    quick(out, n_trials=1)
    assert (out / "study.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    study = optuna.load_study(study_name="s", storage=sqlite_url(out))
    assert len(finished(study)) == 1
