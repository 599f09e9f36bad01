"""Where a study lives and how it is driven: Optuna storages (SQLite, journal file, PostgreSQL),
samplers and pruners, and opening a study that several workers may create at once."""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import optuna

from autonorm._errors import AutoNormError, ConfigError
from autonorm._io import mask_password
from autonorm._trial_keys import STUDY_INFO
from autonorm.budget import Budget
from autonorm.search._fingerprint import flat_differences
from autonorm.search._workers import RetryStaleTrial

log = logging.getLogger(__name__)

#: The samplers and pruners a search names (any Optuna sampler or pruner object is taken too).
SamplerName = Literal["tpe", "random"]
PrunerName = Literal["median", "hyperband", "none"]
SAMPLERS = get_args(SamplerName)
PRUNERS = get_args(PrunerName)
#: The embedded storage's file in the bundle folder.
SQLITE_FILE = "study.db"


def sqlite_url(folder: Path) -> str:
    """The SQLAlchemy URL of the embedded storage of the bundle folder ``folder``.

    The path is percent-quoted: SQLAlchemy reads ``?`` as the start of the URL's query and
    decodes ``%XX``, so an out_dir named ``runs?1`` or ``50%`` would open another file.
    """
    from urllib.parse import quote

    return f"sqlite:///{quote(str((folder / SQLITE_FILE).resolve()))}"


def postgres_driver_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> the installed driver's SQLAlchemy URL.

    SQLAlchemy's plain ``postgresql://`` means psycopg2; with only psycopg 3 installed (the
    ``postgres`` extra) the URL becomes ``postgresql+psycopg://``. Other URLs are returned as
    they are.
    """
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql{sep}{rest}"
    if importlib.util.find_spec("psycopg") is not None:
        return f"postgresql+psycopg{sep}{rest}"
    raise AutoNormError(
        f"storage {mask_password(url)!r} needs a PostgreSQL driver: pip install 'autonorm[postgres]'"
    )


def journal_path(storage: Any) -> Path | None:
    if isinstance(storage, (str, os.PathLike)) and "://" not in os.fspath(storage):
        return Path(os.fspath(storage)).resolve()
    return None


def _open_rdb(url: str, **kwargs: Any) -> optuna.storages.RDBStorage:
    """RDBStorage, retried when workers starting together race to create the schema."""
    import sqlalchemy.exc

    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is "experimental" in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except (
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.ProgrammingError,
            sqlalchemy.exc.OperationalError,  # SQLite: "table studies already exists"
        ) as err:
            lost_race = not isinstance(err, sqlalchemy.exc.OperationalError) or (
                "already exists" in str(err)
            )
            if attempt == 5 or not lost_race:  # another operational error: not a race
                raise
            log.debug("storage schema created concurrently (%s): retrying", type(err).__name__)
            time.sleep(0.2 * (attempt + 1) * (1 + random.random()))
    raise AssertionError("unreachable")


def make_storage(
    storage: str | os.PathLike[str] | optuna.storages.BaseStorage | None,
    out_dir: Path,
    *,
    heartbeat_interval: float | None = None,
    grace_period: float | None = None,
) -> optuna.storages.BaseStorage:
    """Optuna storage from autonorm's storage argument.

    ``None``: a SQLite file ``study.db`` in ``out_dir``; a URL with ``://``: Optuna's RDB storage
    (SQLAlchemy; ``postgresql://`` uses psycopg 3 when psycopg2 is missing); any other string
    or path: Optuna's journal file storage (several processes on one host); a storage object is
    used as it is. With ``heartbeat_interval``, a PostgreSQL/MySQL storage runs Optuna's
    heartbeat: a trial silent for ``grace_period`` seconds is failed and retried once.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    text = sqlite_url(out_dir) if storage is None else os.fspath(storage)
    if "://" in text:
        url = postgres_driver_url(text)
        kwargs: dict[str, Any] = {}
        if heartbeat_interval is not None and not url.startswith("sqlite"):
            kwargs = {
                "heartbeat_interval": max(1, math.ceil(heartbeat_interval)),
                "grace_period": max(2, math.ceil(grace_period or 4 * heartbeat_interval)),
                "heartbeat_stale_trial_callback": RetryStaleTrial(),
            }
        try:
            return _open_rdb(url, **kwargs)
        except Exception as err:  # SQLAlchemy raises many kinds: name the URL and the cause
            cause = mask_password(str(err).splitlines()[0] if str(err) else type(err).__name__)
            raise AutoNormError(f"cannot open storage {mask_password(text)!r}: {cause}") from None
    path = Path(text)
    if not path.parent.is_dir():
        raise AutoNormError(f"journal storage folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise AutoNormError(
            f"storage {text!r} is a folder: give a journal file in it (e.g. "
            f"{str(path / 'journal.log')!r}) or a database URL"
        )
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def is_sqlite(storage: Any) -> bool:
    return str(getattr(storage, "url", "")).startswith("sqlite")


def make_sampler(
    sampler: str | optuna.samplers.BaseSampler, seed: int | None
) -> optuna.samplers.BaseSampler:
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if sampler == "tpe":
        # infeasible trials carry trial.set_constraint("budget", 1.0), which TPE reads itself
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"`sampler` must be one of {SAMPLERS} or an optuna sampler, got {sampler!r}")


def make_pruner(
    pruner: str | optuna.pruners.BasePruner | None, max_epochs: int
) -> optuna.pruners.BasePruner:
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1))
    if pruner in ("none", None):
        return optuna.pruners.NopPruner()
    raise ValueError(f"`pruner` must be one of {PRUNERS} or an optuna pruner, got {pruner!r}")


def open_study(
    storage: Any,
    name: str,
    directions: list[Any],
    *,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    existing: optuna.Study | None,
) -> tuple[optuna.Study, bool]:
    """The study and whether this call created it. Workers starting together race to create
    it: the storage lets one win (DuplicatedStudyError for the others), who then load it."""
    if existing is None:
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                directions=directions,
                sampler=sampler,
                pruner=pruner,
                load_if_exists=False,
            )
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            log.debug("study %r was created by another worker", name)
    for attempt in range(20):
        try:
            return optuna.load_study(
                study_name=name, storage=storage, sampler=sampler, pruner=pruner
            ), False
        except KeyError:  # created, not yet visible to this connection
            time.sleep(0.05 * (attempt + 1))
    raise AutoNormError(f"study {name!r} exists but cannot be loaded from its storage")


def check_study_compatible(
    study: optuna.Study, params: dict[str, list[str]], directions: list[str]
) -> None:
    """Refuse a space or direction that differs from an existing study's (Optuna would fail later
    with a less clear message, or silently mix two searches)."""
    existing = [d.name.lower() for d in study.directions]
    wanted = [("minimize" if d == "min" else "maximize") for d in directions]
    if study.get_trials(deepcopy=False) and existing != wanted:
        raise AutoNormError(
            f"study {study.study_name!r} has directions {existing}, this search asks for {wanted}; "
            "use the same mode/objectives, or start a new study (--search.study_name / "
            "study_name=..., or a new out_dir)"
        )
    changed = []
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            choices = list(getattr(dist, "choices", ()))
            if name in params and choices != params[name]:
                changed.append(f"{name}: study has {choices}, space gives {params[name]}")
        if changed:
            break
    if changed:
        raise ConfigError(
            f"the search space changed against the existing study {study.study_name!r} (Optuna "
            f"cannot change a categorical parameter's choices): {'; '.join(changed)}; use the "
            "same space, or start a new study (--search.study_name / study_name=..., or a new "
            "out_dir)"
        )


#: The settings that define a study (``study.user_attrs["autonorm"]``): a rerun that changes one
#: of them would mix trials that answer different questions. ``budget.trainings`` is compute the
#: rerun may add, not a change of the study.
DEFINING_SETTINGS = (
    "model_class",
    "slots",
    "monitor",
    "mode",
    "objectives",
    "budget",
    "space",
    "max_epochs",
    "warm_start",
    "default_config",
    "experiment",
)
_ADDABLE_BUDGET = ("trainings",)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _difference(key: str, old: Any, new: Any) -> list[str]:
    if key == "budget":  # no budget is the default budget (devices 1, ...)
        default = Budget().to_dict()
        old_b, new_b = {**default, **dict(old or {})}, {**default, **dict(new or {})}
        return [
            f"budget.{k} {_shown(old_b.get(k))} -> {_shown(new_b.get(k))}"
            for k in sorted(set(old_b) | set(new_b))
            if k not in _ADDABLE_BUDGET and old_b.get(k) != new_b.get(k)
        ]
    if old == new:
        return []
    if key == "slots":
        names = [[s.get("name") for s in v or []] for v in (old, new)]
        if names[0] != names[1]:
            return [f"slots {len(names[0])} -> {len(names[1])} ({_shown(names[1])})"]
        return ["slots: same names, other kinds or channels"]
    if key in ("space", "experiment"):  # each nested value that differs, by its dotted key
        where = "space" if key == "space" else ""
        return [f"{k} {_shown(a)} -> {_shown(b)}" for k, a, b in flat_differences(old, new, where)]
    return [f"{key} {_shown(old)} -> {_shown(new)}"]


def settings_differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"<setting> <old> -> <new>"`` for each defining setting that differs (settings a study
    recorded before autonorm recorded them are not compared)."""
    out: list[str] = []
    for key in DEFINING_SETTINGS:
        if key in stored:
            out.extend(_difference(key, stored[key], new.get(key)))
    return out


def check_study_settings(study: optuna.Study, info: dict[str, Any]) -> None:
    """Refuse to join a study recorded with other defining settings (never overwrite them).

    Raises:
        AutoNormError: one line naming each difference (old -> new) and how to go on.
    """
    stored = study.user_attrs.get(STUDY_INFO)
    if not isinstance(stored, dict):
        return
    changed = settings_differences(stored, info)
    if changed:
        raise AutoNormError(
            f"study {study.study_name!r} was recorded with other settings: {'; '.join(changed)}; "
            "rerun with its settings to resume it, or start a new study "
            "(--search.study_name / study_name=..., or a new out_dir)"
        )
