"""One callback class per concern: the factory builds the mode's class; a trial runs its task."""

from __future__ import annotations

import optuna
import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from autonorm import NormConfig
from autonorm.callbacks import AutoNorm, FixedNorms, LearnNorms, TrialNorms, TrialTask
from autonorm.search._planned import (
    CONFIRM,
    PROMOTE,
    SCREEN,
    Candidate,
    Continued,
    Planned,
    trial_task,
)
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


@pytest.mark.parametrize(
    ("kwargs", "cls"),
    [
        ({"mode": "learn", "finalize": True}, LearnNorms),
        ({}, LearnNorms),
        ({"config": NormConfig({"bn1": "layernorm"}), "check_model": False}, FixedNorms),
        ({"trial": "a trial", "monitor": "val_acc"}, TrialNorms),
    ],
)
def test_the_factory_builds_the_class_of_the_mode(kwargs, cls):
    callback = AutoNorm(**kwargs)
    assert type(callback) is cls and isinstance(callback, AutoNorm)
    assert callback.state_key == "AutoNorm"  # checkpoints restore into whichever class wrote them


def test_the_factory_names_the_mode_an_argument_belongs_to():
    with pytest.raises(ValueError, match=r"`space` applies to mode='search' only.*mode='learn'"):
        AutoNorm(space="cnn")
    with pytest.raises(TypeError, match=r"unexpected arguments \['colour'\]"):
        AutoNorm(mode="learn", colour="red")
    # another mode's arguments left at their defaults are dropped, as the single callback did
    assert type(AutoNorm(config=None, trial=None, init="uniform", monitor="val_loss")) is LearnNorms
    fixed = AutoNorm(config=NormConfig({"bn1": "layernorm"}), space="auto", finalize=False)
    assert type(fixed) is FixedNorms


def test_each_class_shows_its_own_arguments():
    import inspect

    assert "finalize" in inspect.signature(LearnNorms).parameters
    assert list(inspect.signature(FixedNorms).parameters)[:2] == ["config", "check_model"]
    assert "task" in inspect.signature(TrialNorms).parameters


def test_a_mode_class_is_used_directly_and_checkpoints_carry_its_mode(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callback = FixedNorms(NormConfig({"bn1": "groupnorm(groups=2)"}), include="bn1")
    trainer = tiny_trainer(tmp_path, [callback, ckpt], max_epochs=1, enable_checkpointing=True)
    trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["autonorm"]["mode"] == "fixed"
    assert saved["callbacks"]["AutoNorm"]["config"]["slots"]["bn1"]["groups"] == 2


def _train_trial(tmp_path, task, pruner=None, max_epochs=3):
    study = optuna.create_study(pruner=pruner or optuna.pruners.NopPruner())

    def objective(trial):
        callback = TrialNorms(trial, space="minimal", task=task)
        trainer = tiny_trainer(tmp_path, [callback], max_epochs=max_epochs)
        trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
        return callback.outcome(trainer).value

    study.optimize(objective, n_trials=1)
    return study.trials[0]


def test_a_task_that_stops_at_its_rung_is_recorded_as_screened(tmp_path):
    trial = _train_trial(tmp_path, TrialTask(stage=SCREEN, stop_after=1))
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["epochs"] == 1
    assert trial.user_attrs["prune_reason"].startswith("screened: stopped at its rung of 1")


def test_the_pruner_stops_a_prunable_task_and_spares_the_others(tmp_path):
    pruned = _train_trial(tmp_path, TrialTask(), pruner=_AlwaysPrune())
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.user_attrs["epochs"] == 1
    spared = _train_trial(tmp_path, TrialTask(stage=PROMOTE, prunable=False), pruner=_AlwaysPrune())
    assert spared.state == optuna.trial.TrialState.COMPLETE and spared.user_attrs["epochs"] == 3


@pytest.mark.parametrize(
    ("planned", "task"),
    [
        # a planned trial stops where the plan says: at its rung (saving its state there) ...
        (
            Planned(SCREEN, Candidate("x", {}), rung=2),
            dict(stage=SCREEN, stop_after=2, prunable=False, seed=7, checkpoint="trial-5.ckpt"),
        ),
        # ... or at the end of the schedule, continuing the screened run; its k-th run: seed + k
        (
            Planned(PROMOTE, Candidate("x", {}), continues=Continued(3, 2)),
            dict(stage=PROMOTE, prunable=False, seed=7, resume_from="trial-3.ckpt"),
        ),
        (Planned(CONFIRM, Candidate("x", {}), run=1), dict(stage=CONFIRM, prunable=False, seed=8)),
    ],
)
def test_the_plan_hands_each_trial_the_task_it_stored(planned, task, tmp_path):
    (tmp_path / "trial-3.ckpt").touch()  # the checkpoint of the screened run it continues
    expected = {
        k: tmp_path / v if k in ("checkpoint", "resume_from") else v for k, v in task.items()
    }
    stored = planned.user_attrs()
    assert trial_task(5, stored, checkpoints=tmp_path, base_seed=7) == TrialTask(**expected)
    if planned.continues is not None:  # its checkpoint gone: the full schedule from scratch
        (tmp_path / "trial-3.ckpt").unlink()
        assert trial_task(5, stored, checkpoints=tmp_path, base_seed=7).resume_from is None
    assert trial_task(5, {}) == TrialTask(seed=0)  # the sampler's trial: full schedule, prunable


def test_a_task_refuses_a_rung_of_no_epochs():
    with pytest.raises(ValueError, match="stop_after"):
        TrialTask(stop_after=0)
