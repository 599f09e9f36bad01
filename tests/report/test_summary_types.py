"""The typed summary (``autonorm.report.Summary``) is what ``summary.json`` holds: every key a
written file has is declared, every required key is written, each value has its declared type,
and the keys come in the declared order."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path

import optuna
import pytest
import typing_extensions

from autonorm._trial_keys import BASELINE, CONFIG, STUDY_INFO
from autonorm.budget import Budget
from autonorm.config import SlotRecord
from autonorm.report import BudgetLimits, SlotInfo, Summary, _types, write_summary
from tests.report.studies import SLOTS, make_study, multi_objective_study, params

#: Parts the summary copies from the study's settings as they are stored (their key order is
#: the study's, not the type's).
COPIED = (SlotInfo, BudgetLimits)


def _hints(typed_dict: type) -> dict[str, object]:
    return typing_extensions.get_type_hints(typed_dict)


def _reachable(hint: object, found: set[type]) -> set[type]:
    """Every TypedDict ``hint`` names, itself included."""
    if typing_extensions.is_typeddict(hint):
        assert isinstance(hint, type)
        if hint not in found:
            found.add(hint)
            for field in _hints(hint).values():
                _reachable(field, found)
        return found
    for arg in typing.get_args(hint):
        _reachable(arg, found)
    return found


def _check(value: object, hint: object, where: str, seen: set[type]) -> None:
    """Assert that ``value`` (loaded from JSON) has the type ``hint``; record the TypedDicts
    checked in ``seen``."""
    if isinstance(hint, (str, typing.ForwardRef)):  # the recursive Json alias names itself
        name = hint if isinstance(hint, str) else hint.__forward_arg__
        hint = vars(_types)[name]
    origin = typing.get_origin(hint)
    if typing_extensions.is_typeddict(hint):
        assert isinstance(hint, type)
        assert isinstance(value, dict), f"{where}: {value!r} is no {hint.__name__}"
        declared = _hints(hint)
        undeclared = set(value) - set(declared)
        assert not undeclared, f"{where}: keys {sorted(undeclared)} not in {hint.__name__}"
        missing = set(hint.__required_keys__) - set(value)  # type: ignore[attr-defined]
        assert not missing, f"{where}: required keys {sorted(missing)} missing"
        if hint not in COPIED:
            assert list(value) == [k for k in declared if k in value], f"{where}: key order"
        for key, item in value.items():
            _check(item, declared[key], f"{where}.{key}", seen)
        seen.add(hint)
    elif origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            try:
                _check(value, arm, where, seen)
                return
            except AssertionError as err:
                errors.append(str(err))
        raise AssertionError(f"{where}: {value!r} matches no arm of {hint}: {errors}")
    elif origin is typing.Literal:
        assert value in typing.get_args(hint), f"{where}: {value!r} not in {hint}"
    elif origin is list:
        assert isinstance(value, list), f"{where}: {value!r} is no list"
        for i, item in enumerate(value):
            _check(item, typing.get_args(hint)[0], f"{where}[{i}]", seen)
    elif origin is dict:
        assert isinstance(value, dict), f"{where}: {value!r} is no dict"
        for key, item in value.items():
            assert isinstance(key, str)
            _check(item, typing.get_args(hint)[1], f"{where}[{key!r}]", seen)
    elif hint is type(None):
        assert value is None, f"{where}: {value!r} is not None"
    elif hint is float:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif hint in (int, str, bool):
        assert isinstance(hint, type)
        assert isinstance(value, hint) and (hint is bool or not isinstance(value, bool)), (
            f"{where}: {value!r} is no {hint.__name__}"
        )
    else:
        raise AssertionError(f"{where}: the test does not know the type {hint!r}")


def _studies(tmp_path: Path) -> list[optuna.Study]:
    """Studies whose summaries hold every part: a best config with its inference cost, runner-up
    and baseline, slot records and a budget as the search stores them; a Pareto front; none."""
    (tmp_path / "single").mkdir()
    plans = [
        (params("layernorm", "layernorm", "layernorm"), {BASELINE: "own norms"}),
        (params("batchnorm", "batchnorm", "groupnorm(g=4)"), {}),
        (params("batchnorm", "batchnorm", "groupnorm(g=4)"), {}),  # a second run
        (params("batchnorm", "layernorm", "layernorm"), {"plan": "pruned"}),
        (params("layernorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_start"}),
    ]
    single = make_study(tmp_path / "single", plans)
    info = dict(single.user_attrs[STUDY_INFO])
    record = SlotRecord("channels_first", 8, input_shape=(2, 8, 4, 4), feeder="conv")
    info["slots"] = [{"name": s, "kind": "BatchNorm2d", **record.to_value()} for s in SLOTS]
    info["budget"] = Budget(max_memory="1GiB", max_params=1000, trainings=2.5).to_dict()
    info["budget_epochs"] = 7.5
    single.set_user_attr(STUDY_INFO, info)
    (tmp_path / "multi").mkdir()
    multi = multi_objective_study(tmp_path / "multi", [(1.0, 2.0, True), (2.0, 1.0, True)])
    (tmp_path / "empty").mkdir()
    empty = make_study(tmp_path / "empty", [], name="empty")
    return [single, multi, empty, _switchable_winner(tmp_path, info)]


def _switchable_winner(tmp_path: Path, info: dict) -> optuna.Study:
    """A study whose best config keeps a SwitchableNorm: its summary names the best config of
    plain layers (``deployable``)."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'switchable.db'}", study_name="sn", direction="minimize"
    )
    study.set_user_attr(STUDY_INFO, {**info, "slots": info["slots"][:1]})
    distribution = optuna.distributions.CategoricalDistribution(["switchable", "batchnorm"])
    for choice, value in (("switchable", 0.1), ("batchnorm", 0.2)):
        study.add_trial(
            optuna.trial.create_trial(
                params={SLOTS[0]: choice},
                distributions={SLOTS[0]: distribution},
                value=value,
                user_attrs={CONFIG: {SLOTS[0]: choice}},
            )
        )
    return study


def test_the_summary_type_declares_exactly_what_summary_json_holds(tmp_path):
    seen: set[type] = set()
    for i, study in enumerate(_studies(tmp_path)):
        out = tmp_path / f"bundle{i}"
        returned = write_summary(study, out, elapsed=1.5)
        written = json.loads((out / "summary.json").read_text())
        assert written == returned
        _check(written, Summary, study.study_name, seen)
    # every part of the summary was met in a written file, so every key of it was checked
    assert seen == _reachable(Summary, set())


def test_the_check_catches_an_undeclared_or_missing_key(mixed_study, tmp_path):
    write_summary(mixed_study, tmp_path)
    written = json.loads((tmp_path / "summary.json").read_text())
    _check(written, Summary, "summary", set())
    extra = {**written, "trials": {**written["trials"], "lost": 0}}
    with pytest.raises(AssertionError, match=r"keys \['lost'\] not in TrialCounts"):
        _check(extra, Summary, "summary", set())
    missing = {k: v for k, v in written.items() if k != "written_at"}
    with pytest.raises(AssertionError, match=r"required keys \['written_at'\] missing"):
        _check(missing, Summary, "summary", set())


def test_optional_keys_are_the_ones_older_studies_lack():
    """Only the study's stored records have keys that may be missing; everything the summary
    computes is always written."""
    optional = {
        td.__name__: sorted(td.__optional_keys__)  # type: ignore[attr-defined]
        for td in _reachable(Summary, set())
        if td.__optional_keys__  # type: ignore[attr-defined]
    }
    assert optional == {
        "SlotInfo": ["feeder", "input_shape", "original"],
        "BudgetLimits": ["devices", "trainings"],
    }
