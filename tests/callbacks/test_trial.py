"""Search mode: the callback's side of an Optuna trial, with real studies and Trainers."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

import autonorm
from autonorm import AutoNormError, NormChoice
from autonorm.callbacks import AutoNorm, TrialOutcome
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer

SLOTS = ["bn1", "bn2", "head_norm"]


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_search_mode_with_a_real_study(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", sampler=optuna.samplers.RandomSampler(seed=0)
    )

    def objective(trial):
        model = TinyConvNet()
        callback = AutoNorm(trial=trial, space="cnn", monitor="val_loss")
        trainer = tiny_trainer(tmp_path, [callback], max_epochs=2)
        trainer.fit(model, datamodule=TinyDataModule())
        applied = {slot.name: slot.keep_choice() for slot in autonorm.find_slots(model)}
        assert applied == {name: NormChoice.parse(label) for name, label in trial.params.items()}
        return float(trainer.callback_metrics["val_loss"])

    study.optimize(objective, n_trials=2)
    trial = study.trials[0]
    assert set(trial.params) == set(SLOTS)
    assert set(trial.intermediate_values) == {0, 1}
    assert trial.user_attrs["config"].keys() == set(SLOTS)
    assert trial.user_attrs["n_params"] > 0 and trial.user_attrs["peak_memory"] > 0
    assert trial.user_attrs["step_time"] > 0
    assert "batchnorm" in study.trials[0].distributions["bn1"].choices


def test_search_mode_prunes(tmp_path):
    study = optuna.create_study(pruner=_AlwaysPrune())

    def objective(trial):
        trainer = tiny_trainer(tmp_path, [AutoNorm(trial=trial)], max_epochs=3)
        trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
        return 0.0

    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "epoch 0" in trial.user_attrs["prune_reason"]


def test_search_mode_over_memory_budget_is_infeasible(tmp_path):
    study = optuna.create_study()

    def objective(trial):
        cb = AutoNorm(trial=trial, budget=autonorm.Budget(max_memory="1KiB"))
        tiny_trainer(tmp_path, [cb], max_epochs=2).fit(TinyConvNet(), datamodule=TinyDataModule())
        return 0.0

    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["feasible"] is False
    assert "peak memory" in trial.user_attrs["infeasible_reason"]
    assert trial.user_attrs["peak_memory"] > 1024
    assert "epochs" not in trial.user_attrs  # ended at once, before any validation


def test_monitor_never_logged_names_the_logged_metrics(tmp_path):
    study = optuna.create_study()

    def objective(trial):
        cb = AutoNorm(trial=trial, monitor="val_accuracy")
        tiny_trainer(tmp_path, [cb], max_epochs=1).fit(TinyConvNet(), datamodule=TinyDataModule())
        return 0.0

    with pytest.raises(AutoNormError, match=r"'val_accuracy' was never logged.*val_acc"):
        study.optimize(objective, n_trials=1)


def test_outcome_gives_the_runner_the_metric_and_the_measurements(tmp_path):
    study = optuna.create_study()
    outcomes = []

    def objective(trial):
        callback = AutoNorm(trial=trial, space="minimal")
        trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
        trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
        outcomes.append(callback.outcome(trainer))
        assert outcomes[-1].value == float(trainer.callback_metrics["val_loss"])
        return outcomes[-1].value

    study.optimize(objective, n_trials=1)
    (outcome,) = outcomes
    assert isinstance(outcome, TrialOutcome) and math.isfinite(outcome.value)
    assert outcome.measurements["n_params"] > 0 and outcome.measurements["peak_memory"] > 0
    assert outcome.measurements["memory_method"] == "cpu-estimate"
    assert {k: study.trials[0].user_attrs[k] for k in outcome.measurements} == (
        outcome.measurements
    )


def test_outcome_of_a_non_finite_metric_prunes_with_its_reason(tmp_path):
    study = optuna.create_study()

    def objective(trial):
        callback = AutoNorm(trial=trial, space="minimal")
        trainer = tiny_trainer(tmp_path, [callback], max_epochs=1, limit_val_batches=0)
        trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
        trainer.callback_metrics["val_loss"] = torch.tensor(float("nan"))
        return callback.outcome(trainer).value

    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["prune_reason"] == "val_loss is nan at the end of training"


def test_outcome_of_a_metric_never_logged_names_the_logged_metrics(tmp_path):
    study = optuna.create_study()
    trial = study.ask()
    callback = AutoNorm(trial=trial, monitor="val_accuracy", space="minimal")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1, limit_val_batches=0)
    trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
    trainer.callback_metrics["val_acc"] = torch.tensor(0.5)
    with pytest.raises(AutoNormError, match=r"'val_accuracy' was never logged.*val_acc"):
        callback.outcome(trainer)


def test_out_of_memory_marks_the_trial_infeasible_in_the_callback(tmp_path):
    study = optuna.create_study()
    trial = study.ask()
    callback = AutoNorm(trial=trial, space="minimal")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fit(TinyConvNet(fail_with="oom"), datamodule=TinyDataModule())
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    frozen = study.trials[0]
    assert frozen.user_attrs["feasible"] is False
    assert frozen.user_attrs["infeasible_reason"] == "out of memory during training"
    assert frozen.user_attrs["prune_reason"] == "infeasible: out of memory during training"
    assert frozen.constraints == {"budget": 1.0}


def test_other_errors_leave_the_trial_feasible(tmp_path):
    study = optuna.create_study()
    trial = study.ask()
    callback = AutoNorm(trial=trial, monitor="val_accuracy", space="minimal")
    with pytest.raises(AutoNormError, match="never logged"):
        tiny_trainer(tmp_path, [callback], max_epochs=1).fit(
            TinyConvNet(), datamodule=TinyDataModule()
        )
    assert "feasible" not in study.trials[0].user_attrs


def test_budget_as_a_dict(tmp_path):
    study = optuna.create_study()

    def objective(trial):
        cb = AutoNorm(trial=trial, budget={"max_params": 10})
        assert cb.budget == autonorm.Budget(max_params=10)
        tiny_trainer(tmp_path, [cb], max_epochs=1).fit(TinyConvNet(), datamodule=TinyDataModule())
        return 0.0

    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "budget max_params=10" in trial.user_attrs["infeasible_reason"]
    with pytest.raises(ValueError, match="unknown keys"):
        AutoNorm(budget={"memory": "1GiB"})


def test_setup_probes_the_model_once(tmp_path, counting_net):
    Counting, calls = counting_net
    study = optuna.create_study()
    callback = AutoNorm(trial=study.ask(), space="minimal", record_metrics=False)
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=0)
    trainer.fit(Counting(), datamodule=TinyDataModule())
    assert calls == [4]  # one probe: the slots are found once and handed on
