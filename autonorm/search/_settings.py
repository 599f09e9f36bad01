"""The settings of one search, declared once: :class:`SearchSettings`.

Its fields are :func:`autonorm.search`'s keyword arguments (the function's signature is made
from them), the ``autonorm search`` command's ``--search.<field>`` options (generated from the
field types, the CLI type in a field's metadata where the Python one is wider, and the help from
the docstring below) and their documentation. Defaults live here only.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from autonorm._errors import AutoNormError
from autonorm.budget import CLI_TYPE, Budget, as_budget
from autonorm.config import NormConfig
from autonorm.search._storage import PrunerName, SamplerName
from autonorm.search_spaces import SearchSpace, resolve_space

#: Secondary objectives of a multi-objective search (minimized) -> the trial measurement.
EXTRA_OBJECTIVES = {"peak_memory": "peak_memory", "latency": "step_time", "params": "n_params"}
METRIC = "metric"
#: Training epochs of a trial when ``trainer_kwargs`` does not say.
DEFAULT_MAX_EPOCHS = 3
#: How the learn pass of each learned warm start mixes: softmax SN (``"learn"``, the default:
#: its derived configs retrained better at small batches in ``benchmarks/bench_search.py``) or
#: Sparse SN (``"learn-sparse"``, Shao et al. 2019).
LearnedWarmStart = Literal["learn", "learn-sparse"]
LEARN_MIXINGS: dict[str, str] = {"learn": "softmax", "learn-sparse": "sparsestmax"}
WARM_STARTS = (True, False, *get_args(LearnedWarmStart))
#: The direction of the monitored metric.
Direction = Literal["min", "max"]
#: Folder of the bundles whose ``out_dir`` is not given, under the working directory.
RUNS_FOLDER = "autonorm-runs"

#: Field metadata key: the default as a user writes it, where the field holds it resolved.
GIVEN_DEFAULT = "given_default"


def _cli(kind: Any, **more: Any) -> dict[str, Any]:
    return {CLI_TYPE: kind, **more}


_NOT_CLI = _cli(None)


def default_study_name(model_class_name: str) -> str:
    """The study name of a search not given one: ``autonorm-<ModelClass>``."""
    return f"autonorm-{model_class_name}"


def default_out_dir(study_name: str) -> Path:
    """The bundle folder of a study not given one: ``./autonorm-runs/<study name>``."""
    return Path.cwd() / RUNS_FOLDER / study_name


@dataclass(frozen=True)
class SearchSettings:
    """Everything :func:`autonorm.search` is asked to do but the model and the data, validated
    and resolved on construction (budget coerced, space resolved for the budget, grace period
    and epochs filled in).

    Attributes:
        n_trials: the total number of finished (complete or pruned) trials the study should
            hold, however many workers share it; a resumed study runs only the missing ones
            (give a larger number to add trials). None: the compute budget bounds the search
            (``budget.trainings``, by default as many trainings as the own-norms and uniform
            baselines, the grid a user would run by hand, with or without a warm start).
        timeout: stop starting new trials after this many seconds.
        space: the search space: a preset name (``auto``, ``cnn``, ``transformer``,
            ``minimal``), a YAML file, a dict or a :class:`~autonorm.search_spaces.SearchSpace`.
        budget: an :class:`~autonorm.Budget` or its dict: peak memory per training step, the
            per-device batch size the trials train with, parameter count, devices, and the
            compute the search may spend (``trainings``: every epoch counts, screening, pruned
            and re-evaluation epochs and the learn pass included).
        monitor: the logged metric to optimize.
        mode: ``min`` or ``max``: the direction of ``monitor``.
        trainer_kwargs: ``Trainer`` arguments of each trial (default: Lightning's
            ``max_epochs``, ``accelerator="auto"`` on one device, no checkpoints, no logger);
            on the command line, ``--trainer.<arg>``.
        storage: None (SQLite ``study.db`` in ``out_dir``), a SQLAlchemy URL (PostgreSQL for
            workers on several machines), a journal file (several workers on one host) or an
            Optuna storage; every search given the same storage and study name joins the study
            as one more worker. On the command line the default is ``$AUTONORM_STORAGE``, which
            keeps a password off the command line.
        study_name: the study's name (default ``autonorm-<ModelClass>``); an existing study
            resumes.
        out_dir: the bundle folder (default ``./autonorm-runs/<study name>``).
        sampler: ``tpe`` (seeded), ``random`` or an Optuna sampler.
        pruner: ``median``, ``hyperband``, ``none`` or an Optuna pruner.
        seed: seed of the sampler and of each trial's training (``seed + trial.number``).
        warm_start: true: the staged search (screen the model's own norms, every uniform family
            and the recommended config at a third of the epochs, promote the best to the full
            schedule, refine groups of slots, re-evaluate the leaders with other seeds); learn:
            first one learned SwitchableNorm run whose derived config joins the screen and
            narrows each slot's choices; learn-sparse: the same with Sparse SwitchableNorm;
            false: every trial comes from the sampler.
        default_config: a config (a :class:`~autonorm.NormConfig` or its YAML file) the search
            keeps unless the evidence says another is better, as it keeps the model's own
            norms: it is screened right after them, always trained in full, and replaced only
            where paired runs show another config better (the own norms too).
        objectives: multi-objective: ``[metric, peak_memory | latency | params]``.
        example_input: input for the slot probe (default: the model's
            ``example_input_array``).
        include: glob patterns selecting the slots to search (default: all).
        exclude: glob patterns of slots left as they are.
        retrain: train the best config once more and save its checkpoint in the bundle.
        verbose: per-trial progress bars and Lightning's logs.
        callbacks: Optuna callbacks ``f(study, frozen_trial)`` run after each trial.
        heartbeat_interval: seconds between the heartbeats of a running trial.
        grace_period: seconds without a heartbeat after which a trial counts as lost: it is
            marked FAIL and its parameters run once more (default 4 x heartbeat_interval).
        export: write the bundle at the end; false for a worker whose bundle another process
            writes (the result then carries no summary).
        collective_timeout: seconds a rank of a trial on several devices waits for the others
            (a collective, a rank's answer) before the trial fails as lost.
    """

    n_trials: int | None = None
    timeout: float | None = None
    space: SearchSpace = field(
        default_factory=lambda: resolve_space("auto"), metadata=_cli(str, given_default="auto")
    )
    budget: Budget | None = field(default=None, metadata=_cli(Budget))
    monitor: str = "val_loss"
    mode: Direction = "min"
    trainer_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_NOT_CLI)
    storage: Any = field(default=None, metadata=_cli(str | None))
    study_name: str | None = None
    out_dir: str | os.PathLike[str] | None = field(default=None, metadata=_cli(str | None))
    sampler: Any = field(default="tpe", metadata=_cli(SamplerName))
    pruner: Any = field(default="median", metadata=_cli(PrunerName))
    seed: int | None = None
    warm_start: bool | LearnedWarmStart = True
    default_config: NormConfig | None = field(default=None, metadata=_cli(str | None))
    objectives: list[str] = field(default_factory=lambda: [METRIC], metadata=_cli(list[str]))
    example_input: Any = field(default=None, metadata=_NOT_CLI)
    include: str | list[str] | None = None
    exclude: str | list[str] | None = None
    retrain: bool = False
    verbose: bool = False
    callbacks: list[Callable[..., None]] = field(default_factory=list, metadata=_NOT_CLI)
    heartbeat_interval: float = 10.0
    grace_period: float | None = None
    export: bool = field(default=True, metadata=_NOT_CLI)
    collective_timeout: float = 1800.0
    #: the values as given, per instance (set in ``__post_init__``; not a field)
    _given: ClassVar[dict[str, Any]]

    def __post_init__(self) -> None:
        # the values as given: replace() resolves changed settings from them, not from the
        # values resolved here (a grace period, a space for another budget)
        object.__setattr__(
            self, "_given", {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        )
        _check(self)
        beat = self.heartbeat_interval
        grace = 4.0 * beat if self.grace_period is None else self.grace_period
        if not grace > beat:
            raise ValueError(
                f"`grace_period` must be longer than `heartbeat_interval`, got grace_period="
                f"{grace!r}, heartbeat_interval={beat!r}"
            )
        budget = as_budget(self.budget)
        trainer_kwargs = dict(self.trainer_kwargs or {})
        trainer_kwargs.setdefault("max_epochs", DEFAULT_MAX_EPOCHS)
        resolved = {
            "budget": budget,
            "space": resolve_space(self.space).for_budget(budget),
            "trainer_kwargs": trainer_kwargs,
            "objectives": _objectives(self.objectives),
            "grace_period": grace,
            "callbacks": list(self.callbacks),
            "default_config": _default_config(self.default_config),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        if self.budget_trainings is not None:
            check_trainings_left(self.budget_trainings, self.reserved_trainings, "budget.trainings")

    @classmethod
    def build(cls, settings: SearchSettings | None, options: Mapping[str, Any]) -> SearchSettings:
        """``settings`` (or the defaults) with ``options`` (field values) replacing its own.

        Raises:
            TypeError: an option that is no field, naming the valid ones.
            ValueError: a value that does not hold.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"search() got unknown settings {unknown}; valid: {names}")
        if settings is None:
            return cls(**options)
        return settings.replace(**options)

    def replace(self, **changes: Any) -> SearchSettings:
        """These settings with ``changes``, resolved again from the values as given (what
        ``dataclasses.replace`` cannot do: it would start from the resolved ones)."""
        return type(self)(**{**self._given, **changes})

    # -- what the search derives from them -----------------------------------------------------

    def study_name_for(self, model_class_name: str) -> str:
        """The study's name: ``study_name``, or ``autonorm-<ModelClass>``."""
        return self.study_name or default_study_name(model_class_name)

    def bundle_dir(self, study_name: str) -> Path:
        """The bundle folder: ``out_dir``, or ``./autonorm-runs/<study name>``."""
        return Path(self.out_dir) if self.out_dir is not None else default_out_dir(study_name)

    def writable_bundle_dir(self, study_name: str) -> Path:
        """:meth:`bundle_dir`, created, and checked to be writable.

        Raises:
            AutoNormError: it cannot be written, saying why.
        """
        out = self.bundle_dir(study_name)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe_file = out / f".write-test-{os.getpid()}"
            probe_file.write_text("")
            probe_file.unlink()
        except OSError as err:
            raise AutoNormError(
                f"out_dir {str(out)!r} cannot be written: {err.strerror or err}"
            ) from None
        return out

    def for_devices(self, devices: int) -> SearchSettings:
        """These settings for trials that train on ``devices`` devices: the budget's
        ``devices`` taken from them (a budget of more devices than one trial's describes a
        final training the trials emulate on one).

        Raises:
            ValueError: the budget names another number of devices than the trials use.
        """
        budget = self.budget
        if devices <= 1 or (budget is not None and budget.devices == devices):
            return self
        if budget is not None and budget.devices != 1:
            raise ValueError(
                f"budget.devices={budget.devices} but each trial trains on {devices} devices "
                "(--trainer.devices): give the same number, or leave budget.devices out"
            )
        given = budget if budget is not None else Budget()
        return self.replace(budget=dataclasses.replace(given, devices=devices))

    @property
    def grace(self) -> float:
        """``grace_period``, resolved (4 x ``heartbeat_interval`` when not given)."""
        assert self.grace_period is not None  # __post_init__ fills it in
        return self.grace_period

    @property
    def budget_trainings(self) -> float | None:
        """The compute budget in trainings, when the budget gives one."""
        return None if self.budget is None else self.budget.trainings

    @property
    def reserved_trainings(self) -> dict[str, int]:
        """The trainings the budget keeps out of the trials' share, by what spends them."""
        reserved = {}
        if str(self.warm_start) in LEARN_MIXINGS:
            reserved["the learn pass"] = 1
        if self.retrain and self.export:
            reserved["the final retraining"] = 1
        return reserved

    @property
    def max_epochs(self) -> int:
        return int(self.trainer_kwargs["max_epochs"])

    @property
    def directions(self) -> list[str]:
        """``"min"`` / ``"max"`` per objective (the extra objectives are minimized)."""
        first: str = self.mode
        return [first] + ["min"] * (len(self.objectives) - 1)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def _check(settings: SearchSettings) -> None:
    """The settings' values as given, before they are resolved.

    Raises:
        ValueError: the first one that does not hold, naming it and the value given.
    """
    n_trials = settings.n_trials
    if n_trials is not None and (
        isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1
    ):
        raise ValueError(f"`n_trials` must be a positive int or None, got {n_trials!r}")
    if settings.timeout is not None and not settings.timeout > 0:
        raise ValueError(f"`timeout` must be > 0 seconds, got {settings.timeout!r}")
    if settings.mode not in get_args(Direction):
        raise ValueError(f"`mode` must be 'min' or 'max', got {settings.mode!r}")
    if not settings.collective_timeout > 0:
        raise ValueError(
            f"`collective_timeout` must be > 0 seconds, got {settings.collective_timeout!r}"
        )
    if not settings.heartbeat_interval > 0:
        raise ValueError(
            f"`heartbeat_interval` must be > 0 seconds, got {settings.heartbeat_interval!r}"
        )
    if settings.warm_start not in WARM_STARTS:
        raise ValueError(
            f"`warm_start` must be True, False, 'learn' or 'learn-sparse', got "
            f"{settings.warm_start!r}"
        )
    for name in ("storage", "out_dir", "study_name"):
        value = getattr(settings, name)
        if isinstance(value, (str, os.PathLike)) and not str(os.fspath(value)).strip():
            raise ValueError(f"`{name}` must not be empty (leave it out for the default)")


def check_trainings_left(trainings: float, reserved: Mapping[str, int], name: str) -> None:
    """Refuse a budget that the ``reserved`` trainings leave without one full training for
    the trials (the own norms' full run at least).

    Raises:
        ValueError: naming the budget (``name``), what is reserved, and the least that works.
    """
    kept = sum(reserved.values())
    if not reserved or trainings - kept >= 1:
        return
    spent = " and ".join(f"{what} ({n} training)" for what, n in reserved.items())
    raise ValueError(
        f"{name}={trainings:g} leaves {max(trainings - kept, 0):g} trainings for the trials after "
        f"{spent}: give at least {kept + 1} trainings, or leave out what is reserved"
    )


def _default_config(value: Any) -> NormConfig | None:
    """The default config as given: a NormConfig, its YAML file, or None."""
    if value is None or isinstance(value, NormConfig):
        return value
    if isinstance(value, (str, os.PathLike)):
        return NormConfig.load(value)
    raise ValueError(f"`default_config` must be a NormConfig or its YAML file, got {value!r}")


def _objectives(objectives: Sequence[str] | None) -> list[str]:
    names = list(objectives) if objectives else [METRIC]
    if (
        names[0] != METRIC
        or any(o not in EXTRA_OBJECTIVES for o in names[1:])
        or len(set(names)) != len(names)
    ):
        raise ValueError(
            f"`objectives` must start with 'metric' followed by distinct names from "
            f"{sorted(EXTRA_OBJECTIVES)}, got {names}"
        )
    return names


# -- the declaration, read by the CLI and by search()'s signature --------------------------------


def field_help(cls: type) -> dict[str, str]:
    """Each field's text in ``cls``'s docstring (``Attributes:`` or ``Args:``), on one plain
    line (``:class:`~a.B``` -> ``B``, ````x```` -> ``x``) for a command line's help."""
    import re

    from docstring_parser import parse

    def plain(text: str) -> str:
        text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", text)
        return " ".join(text.replace("``", "").split())

    return {p.arg_name: plain(p.description or "") for p in parse(inspect.getdoc(cls) or "").params}


def given_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default as a user writes it (``"auto"`` for the space it resolves to)."""
    if GIVEN_DEFAULT in f.metadata:
        return f.metadata[GIVEN_DEFAULT]
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def cli_fields() -> Iterator[tuple[str, Any, Any, str]]:
    """``(option name, type, default, help)`` of every ``--search.<name>`` option the settings
    declare; a :class:`~autonorm.Budget` field becomes ``budget.<its field>``."""
    import typing

    hints = typing.get_type_hints(SearchSettings)
    docs = field_help(SearchSettings)
    for f in dataclasses.fields(SearchSettings):
        kind = f.metadata.get(CLI_TYPE, hints[f.name])
        if kind is None:
            continue
        if kind is Budget:
            yield from _budget_fields()
            continue
        yield f.name, kind, given_default(f), docs.get(f.name, "")


def _budget_fields() -> Iterator[tuple[str, Any, Any, str]]:
    import typing

    hints = typing.get_type_hints(Budget)
    docs = field_help(Budget)
    for f in dataclasses.fields(Budget):
        kind = f.metadata.get(CLI_TYPE, hints[f.name])
        yield f"budget.{f.name}", kind | None, None, docs.get(f.name, "")


def search_signature(
    head: inspect.Signature, returns: Any = inspect.Signature.empty
) -> inspect.Signature:
    """``head`` (the model and data parameters) followed by one keyword-only parameter per
    setting, with its default: the signature ``help(autonorm.search)`` and IDEs show."""
    import typing

    hints = typing.get_type_hints(SearchSettings)
    params = [p for p in head.parameters.values() if p.kind != p.VAR_KEYWORD]
    for f in dataclasses.fields(SearchSettings):
        kind, default = inspect.Parameter.KEYWORD_ONLY, given_default(f)
        params.append(inspect.Parameter(f.name, kind, default=default, annotation=hints[f.name]))
    return head.replace(parameters=params, return_annotation=returns)
