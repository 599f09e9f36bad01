"""The rules of :mod:`autonorm.search._storage` that the search tests take for granted: which
storage each argument opens (SQLite in the bundle, a journal file, a database URL, a storage
object) and with which heartbeat, the driver a ``postgresql://`` URL gets, samplers and pruners
by name, opening a study another worker creates, and each refusal of a rerun that would mix two
searches, word for word. Real storages (SQLite, journal files, PostgreSQL from
``AUTONORM_TEST_POSTGRES_URL``: skipped without it, failed under ``CI=true``), no mocks."""

from __future__ import annotations

import importlib.util
import logging
import threading
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.storages.journal import JournalStorage

from autonorm import AutoNormError, ConfigError
from autonorm._trial_keys import STUDY_INFO
from autonorm.search import _storage as storage
from autonorm.search._workers import RetryStaleTrial
from tests.search.test_workers import postgres_url  # noqa: F401  (a fixture)

HAS_PSYCOPG2 = importlib.util.find_spec("psycopg2") is not None


# -- which storage each argument opens ---------------------------------------------------------


@pytest.mark.parametrize("name", ["runs?1", "50%", "a b#c"])
def test_the_bundle_s_sqlite_url_names_its_own_file_whatever_the_folder_is_called(name, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    url = storage.sqlite_url(folder)
    assert url.startswith("sqlite:///") and "?" not in url and "#" not in url
    study = optuna.create_study(study_name="s", storage=url)
    study.enqueue_trial({})
    assert (folder / "study.db").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_no_storage_is_sqlite_in_the_bundle_folder(tmp_path):
    opened = storage.make_storage(None, tmp_path)
    assert isinstance(opened, optuna.storages.RDBStorage)
    assert opened.url == storage.sqlite_url(tmp_path)
    assert storage.is_sqlite(opened)
    assert storage.journal_path(None) is None


@pytest.mark.parametrize("as_path", [False, True])
def test_a_path_without_a_scheme_is_a_journal_file(as_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = Path("journal.log") if as_path else "journal.log"
    opened = storage.make_storage(given, tmp_path / "elsewhere")
    assert isinstance(opened, JournalStorage)
    assert not storage.is_sqlite(opened)
    optuna.create_study(study_name="s", storage=opened).enqueue_trial({})
    assert (tmp_path / "journal.log").is_file()
    assert storage.journal_path(given) == tmp_path / "journal.log"  # absolute
    assert storage.journal_path("sqlite:///x.db") is None


def test_a_storage_object_is_used_as_it_is(tmp_path):
    given = optuna.storages.InMemoryStorage()
    assert storage.make_storage(given, tmp_path, heartbeat_interval=1) is given
    assert storage.journal_path(given) is None
    assert not storage.is_sqlite(given)


def test_a_journal_in_a_missing_folder_or_a_folder_is_refused_with_what_to_give(tmp_path):
    missing = tmp_path / "nope" / "journal.log"
    with pytest.raises(AutoNormError) as err:
        storage.make_storage(str(missing), tmp_path)
    assert str(err.value) == f"journal storage folder {str(missing.parent)!r} does not exist"
    with pytest.raises(AutoNormError) as err:
        storage.make_storage(str(tmp_path), tmp_path)
    assert str(err.value) == (
        f"storage {str(tmp_path)!r} is a folder: give a journal file in it (e.g. "
        f"{str(tmp_path / 'journal.log')!r}) or a database URL"
    )


def test_a_url_that_cannot_be_opened_names_the_url_and_its_cause(tmp_path):
    url = f"sqlite:///{tmp_path}/no/such/folder/study.db"
    with pytest.raises(AutoNormError) as err:
        storage.make_storage(url, tmp_path)
    assert str(err.value).startswith(f"cannot open storage {url!r}: ")
    assert "unable to open database file" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_sqlite_runs_no_optuna_heartbeat_even_when_asked(tmp_path):
    opened = storage.make_storage(f"sqlite:///{tmp_path}/s.db", tmp_path, heartbeat_interval=1)
    assert opened.heartbeat_interval is None and opened.grace_period is None


@pytest.mark.parametrize(
    ("interval", "grace", "expected"),
    [
        (0.2, None, (1, 2)),  # at least 1 s between beats, at least 2 s of grace
        (2.5, None, (3, 10)),  # grace by default 4 beats
        (3, 7.2, (3, 8)),  # whole seconds, up
    ],
)
def test_postgresql_runs_optuna_s_heartbeat_in_whole_seconds_with_the_retry_callback(
    postgres_url,  # noqa: F811
    tmp_path,
    interval,
    grace,
    expected,  # noqa: F811
):
    opened = storage.make_storage(
        postgres_url, tmp_path, heartbeat_interval=interval, grace_period=grace
    )
    assert (opened.heartbeat_interval, opened.grace_period) == expected
    assert isinstance(opened.failed_trial_callback, RetryStaleTrial)
    plain = storage.make_storage(postgres_url, tmp_path)
    assert plain.heartbeat_interval is None


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_postgresql_url_gets_the_installed_driver(scheme):
    url = storage.postgres_driver_url(f"{scheme}://u:pw@db:5432/x?sslmode=require")
    driver = "postgresql" if HAS_PSYCOPG2 else "postgresql+psycopg"
    assert url == f"{driver}://u:pw@db:5432/x?sslmode=require"


@pytest.mark.parametrize(
    "url", ["sqlite:///x.db", "mysql://u@h/db", "postgresql+psycopg://u@h/db", "journal.log"]
)
def test_other_urls_keep_their_driver(url):
    assert storage.postgres_driver_url(url) == url


# -- the schema race of workers starting together -----------------------------------------------


def test_two_workers_creating_the_same_sqlite_file_at_once_both_open_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    opened, errors = [], []
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        try:
            opened.append(storage.make_storage(url, tmp_path))
        except Exception as err:  # the test's failure message names it
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(opened) == 4


def test_an_operational_error_that_is_no_race_is_not_retried(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=storage.__name__)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="unable to open database file"):
        storage._open_rdb(f"sqlite:///{tmp_path / 'no' / 'such' / 'study.db'}")
    assert not [r for r in caplog.records if r.name == storage.__name__]


# -- samplers and pruners ----------------------------------------------------------------------


def test_samplers_by_name_are_seeded_and_tpe_starts_after_five_trials():
    tpe = storage.make_sampler("tpe", 7)
    assert isinstance(tpe, optuna.samplers.TPESampler) and tpe._n_startup_trials == 5
    draws = [
        [storage.make_sampler("random", 7)._rng.rng.random() for _ in range(1)] for _ in range(2)
    ]
    assert draws[0] == draws[1]
    assert isinstance(storage.make_sampler("random", None), optuna.samplers.RandomSampler)
    own = optuna.samplers.GridSampler({"bn1": ["batchnorm"]})
    assert storage.make_sampler(own, 0) is own
    with pytest.raises(ValueError) as err:
        storage.make_sampler("grid", 0)
    assert str(err.value) == (
        "`sampler` must be one of ('tpe', 'random') or an optuna sampler, got 'grid'"
    )


def test_pruners_by_name():
    median = storage.make_pruner("median", 10)
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert (median._n_startup_trials, median._n_warmup_steps) == (3, 0)
    hyperband = storage.make_pruner("hyperband", 12)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert (hyperband._min_resource, hyperband._max_resource) == (1, 12)
    assert storage.make_pruner("hyperband", 0)._max_resource == 1
    for none in ("none", None):
        assert isinstance(storage.make_pruner(none, 3), optuna.pruners.NopPruner)
    own = optuna.pruners.ThresholdPruner(upper=1.0)
    assert storage.make_pruner(own, 3) is own
    with pytest.raises(ValueError) as err:
        storage.make_pruner("asha", 3)
    assert str(err.value) == (
        "`pruner` must be one of ('median', 'hyperband', 'none') or an optuna pruner, got 'asha'"
    )


# -- opening a study ---------------------------------------------------------------------------


def _open(where, name="s", existing=None, directions=("maximize",)):
    return storage.open_study(
        where,
        name,
        list(directions),
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.NopPruner(),
        existing=existing,
    )


def test_the_first_worker_creates_the_study_the_next_loads_it(tmp_path):
    journal = storage.make_storage(str(tmp_path / "j.log"), tmp_path)
    first, created = _open(journal)
    assert created and first.direction == optuna.study.StudyDirection.MAXIMIZE
    second, created_again = _open(journal)
    assert not created_again and second._study_id == first._study_id
    assert isinstance(second.sampler, optuna.samplers.RandomSampler)
    assert isinstance(second.pruner, optuna.pruners.NopPruner)
    known, created_known = _open(journal, existing=first)
    assert not created_known and known._study_id == first._study_id


def test_a_study_that_exists_but_cannot_be_loaded_is_an_error_naming_it(tmp_path):
    journal = storage.make_storage(str(tmp_path / "j.log"), tmp_path)
    existing = optuna.create_study(study_name="other", storage=journal)
    with pytest.raises(AutoNormError) as err:
        _open(journal, name="gone", existing=existing)
    assert str(err.value) == "study 'gone' exists but cannot be loaded from its storage"


# -- a rerun that would mix two searches ---------------------------------------------------------


def _study_with_a_trial(tmp_path, directions=("maximize",)) -> optuna.Study:
    study = optuna.create_study(
        study_name="s",
        storage=storage.make_storage(str(tmp_path / "j.log"), tmp_path),
        directions=list(directions),
    )
    trial = study.ask()
    trial.suggest_categorical("bn1", ["batchnorm", "groupnorm"])
    trial.suggest_categorical("bn2", ["batchnorm", "layernorm"])
    study.tell(trial, [1.0] * len(directions))
    return study


def test_another_direction_is_refused_once_the_study_has_trials(tmp_path):
    empty = optuna.create_study(study_name="e", direction="maximize")
    storage.check_study_compatible(empty, {}, ["min"])  # nothing to mix yet
    study = _study_with_a_trial(tmp_path)
    storage.check_study_compatible(study, {}, ["max"])
    with pytest.raises(AutoNormError) as err:
        storage.check_study_compatible(study, {}, ["min"])
    assert str(err.value) == (
        "study 's' has directions ['maximize'], this search asks for ['minimize']; use the same "
        "mode/objectives, or start a new study (--search.study_name / study_name=..., or a new "
        "out_dir)"
    )


def test_changed_choices_are_refused_naming_each_parameter(tmp_path):
    study = _study_with_a_trial(tmp_path)
    same = {"bn1": ["batchnorm", "groupnorm"], "bn2": ["batchnorm", "layernorm"]}
    storage.check_study_compatible(study, same, ["max"])
    storage.check_study_compatible(study, {"bn1": same["bn1"]}, ["max"])  # fewer slots searched
    changed = {"bn1": ["batchnorm"], "bn2": ["layernorm", "batchnorm"]}
    with pytest.raises(ConfigError) as err:
        storage.check_study_compatible(study, changed, ["max"])
    assert str(err.value) == (
        "the search space changed against the existing study 's' (Optuna cannot change a "
        "categorical parameter's choices): bn1: study has ['batchnorm', 'groupnorm'], space "
        "gives ['batchnorm']; bn2: study has ['batchnorm', 'layernorm'], space gives "
        "['layernorm', 'batchnorm']; use the same space, or start a new study "
        "(--search.study_name / study_name=..., or a new out_dir)"
    )


def test_each_changed_setting_is_named_old_to_new():
    old = {
        "model_class": "a.Net",
        "monitor": "val_acc",
        "mode": "max",
        "budget": {"batch_size": 8, "trainings": 3},
        "space": {"preset": "small_batch", "slots": {"bn1": ["batchnorm"]}},
        "experiment": {"seed": 1, "data": {"fold": 0}},
        "max_epochs": 3,
    }
    new = {
        **old,
        "model_class": "b.Net",
        "budget": {"batch_size": 4, "trainings": 9, "devices": 2},
        "space": {"preset": "small_batch", "slots": {"bn1": ["groupnorm"]}},
        "experiment": {"seed": 1, "data": {"fold": 2}},
        "max_epochs": 3,
    }
    assert storage.settings_differences(old, new) == [
        "model_class 'a.Net' -> 'b.Net'",
        "budget.batch_size 8 -> 4",
        "budget.devices 1 -> 2",
        "space.slots.bn1 ['batchnorm'] -> ['groupnorm']",
        "data.fold 0 -> 2",
    ]


def test_no_budget_is_the_default_budget_and_long_values_are_cut():
    assert storage.settings_differences({"budget": None}, {"budget": {"devices": 1}}) == []
    assert storage.settings_differences({"budget": {}}, {}) == []
    long_name = "m." + "x" * 80
    (line,) = storage.settings_differences({"model_class": "a"}, {"model_class": long_name})
    assert line == f"model_class 'a' -> {repr(long_name)[:57]}..."
    assert len(line) == len("model_class 'a' -> ") + 60
    sixty = "y" * 58  # its repr is exactly 60 characters: shown whole
    assert storage.settings_differences({"monitor": "a"}, {"monitor": sixty}) == [
        f"monitor 'a' -> {sixty!r}"
    ]


def test_slots_that_differ_only_in_kind_or_channels_say_so():
    old = {"slots": [{"name": "bn1", "channels": 8}]}
    new = {"slots": [{"name": "bn1", "channels": 16}]}
    assert storage.settings_differences(old, new) == ["slots: same names, other kinds or channels"]
    assert storage.settings_differences({"slots": None}, {"slots": [{"name": "a"}]}) == [
        "slots 0 -> 1 (['a'])"
    ]


def test_a_study_recorded_with_other_settings_is_refused_and_kept(tmp_path):
    study = _study_with_a_trial(tmp_path)
    storage.check_study_settings(
        study, {"monitor": "val_loss"}
    )  # nothing recorded: nothing to check
    study.set_user_attr(STUDY_INFO, {"monitor": "val_acc", "max_epochs": 3})
    storage.check_study_settings(study, {"monitor": "val_acc", "max_epochs": 3})
    with pytest.raises(AutoNormError) as err:
        storage.check_study_settings(study, {"monitor": "val_loss", "max_epochs": 5})
    assert str(err.value) == (
        "study 's' was recorded with other settings: monitor 'val_acc' -> 'val_loss'; "
        "max_epochs 3 -> 5; rerun with its settings to resume it, or start a new study "
        "(--search.study_name / study_name=..., or a new out_dir)"
    )
    assert study.user_attrs[STUDY_INFO] == {"monitor": "val_acc", "max_epochs": 3}


def test_a_postgresql_study_another_worker_creates_meanwhile_is_loaded(
    postgres_url,  # noqa: F811
    tmp_path,
):
    name = f"race-{uuid.uuid4().hex[:8]}"
    opened = storage.make_storage(postgres_url, tmp_path)
    results, start = [], threading.Barrier(3)

    def worker() -> None:
        start.wait()
        results.append(_open(storage.make_storage(postgres_url, tmp_path), name=name))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert sorted(created for _, created in results) == [False, False, True]
        assert len({study._study_id for study, _ in results}) == 1
    finally:
        optuna.delete_study(study_name=name, storage=opened)
