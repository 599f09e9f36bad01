"""The search's settings are declared once: search()'s keywords and the CLI's options follow."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import autonorm
from autonorm import Budget
from autonorm.budget import CLI_TYPE
from autonorm.cli._search import CLI_ONLY_OPTIONS, _search_parser
from autonorm.search import SearchSettings
from autonorm.search._settings import field_help
from tests.lightning_models import TinyConvNet, TinyDataModule

#: search()'s parameters that are not settings: the model, the data, and the settings object.
MODEL_AND_DATA = {
    "model",
    "datamodule",
    "train_dataloaders",
    "val_dataloaders",
    "model_kwargs",
    "settings",
}


def _settings_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SearchSettings)}


def test_search_takes_every_setting_as_a_keyword_with_its_one_default():
    params = inspect.signature(autonorm.search).parameters
    assert set(params) - MODEL_AND_DATA == set(_settings_fields())
    defaults = SearchSettings()
    for name in _settings_fields():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        if name not in ("space", "grace_period", "trainer_kwargs"):  # resolved on construction
            assert params[name].default == getattr(defaults, name), name
    assert params["space"].default == "auto" and defaults.space.preset == "auto"


def test_the_cli_offers_every_command_line_setting_and_its_own_options_only():
    parser = _search_parser()
    offered = {
        a.dest.removeprefix("search.") for a in parser._actions if a.dest.startswith("search.")
    }
    command_line = {
        name for name, f in _settings_fields().items() if f.metadata.get(CLI_TYPE, True) is not None
    }
    budget = {f"budget.{f.name}" for f in dataclasses.fields(Budget)}
    declared = (command_line - {"budget"}) | budget | {name for name, *_ in CLI_ONLY_OPTIONS}
    assert offered == declared
    assert not {name for name, *_ in CLI_ONLY_OPTIONS} & set(_settings_fields())


def test_every_setting_is_documented_once_in_the_settings_docstring():
    docs = field_help(SearchSettings)
    assert set(docs) == set(_settings_fields())
    assert all(docs.values())
    assert set(field_help(Budget)) == {f.name for f in dataclasses.fields(Budget)}


def test_the_cli_help_is_the_settings_docstring(tmp_path):
    parser = _search_parser()
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["search.seed"] == field_help(SearchSettings)["seed"]
    assert helps["search.budget.trainings"] == field_help(Budget)["trainings"]


def test_search_refuses_a_keyword_that_is_no_setting_and_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown settings \['n_trial'\].*'n_trials'"):
        autonorm.search(TinyConvNet, TinyDataModule(), n_trial=3)


def test_a_settings_object_and_keywords_combine(tmp_path):
    settings = SearchSettings(n_trials=5, monitor="val_acc", mode="max")
    built = SearchSettings.build(settings, {"n_trials": 2, "out_dir": tmp_path})
    assert (built.n_trials, built.monitor, built.mode, built.out_dir) == (
        2,
        "val_acc",
        "max",
        tmp_path,
    )
    assert built.max_epochs == 3 and built.trainer_kwargs == {"max_epochs": 3}  # applied once


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_trials": 0}, "`n_trials` must be a positive int"),
        ({"mode": "up"}, "`mode` must be 'min' or 'max'"),
        ({"heartbeat_interval": 5.0, "grace_period": 5.0}, "`grace_period` must be longer"),
        ({"out_dir": " "}, "`out_dir` must not be empty"),
        ({"objectives": ["peak_memory"]}, "`objectives` must start with 'metric'"),
    ],
)
def test_settings_refuse_bad_values_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        SearchSettings(**options)


def test_a_budget_the_learn_pass_and_the_retraining_use_up_is_refused_before_training(tmp_path):
    message = (
        r"budget.trainings=2.5 leaves 0.5 trainings for the trials after the learn pass "
        r"\(1 training\) and the final retraining \(1 training\): give at least 3 trainings"
    )
    with pytest.raises(ValueError, match=message):
        autonorm.search(
            TinyConvNet,
            TinyDataModule,
            out_dir=tmp_path,
            budget={"trainings": 2.5},
            warm_start="learn",
            retrain=True,
        )
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
    # one reservation alone leaves room; no reservation keeps a fractional budget
    assert SearchSettings(budget={"trainings": 2.5}, retrain=True).reserved_trainings == {
        "the final retraining": 1
    }
    SearchSettings(budget={"trainings": 0.5})


def test_the_bundle_folder_and_study_name_come_from_one_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = SearchSettings()
    assert settings.study_name_for("Net") == "autonorm-Net"
    assert settings.bundle_dir("autonorm-Net") == tmp_path / "autonorm-runs" / "autonorm-Net"
    given = SearchSettings(study_name="s", out_dir=tmp_path / "out")
    assert given.study_name_for("Net") == "s" and given.bundle_dir("s") == tmp_path / "out"


def test_replacing_a_setting_resolves_the_others_again_from_what_was_given():
    short = SearchSettings(heartbeat_interval=5.0)
    assert short.grace_period == 20.0  # 4 x the heartbeat
    assert short.replace(heartbeat_interval=15.0).grace_period == 60.0
    assert SearchSettings.build(SearchSettings(), {"heartbeat_interval": 50.0}).grace == 200.0
    two_devices = SearchSettings(budget={"devices": 2})
    assert two_devices.space.devices == 2
    assert SearchSettings.build(two_devices, {"budget": None}).space.devices == 1
    more_epochs = SearchSettings(trainer_kwargs={"max_epochs": 5}).replace(seed=3)
    assert (more_epochs.max_epochs, more_epochs.seed) == (5, 3)
