"""``autonorm.search``: per-slot Optuna search under memory and batch budgets, with pruning,
resume, warm start and the export bundle.

Each trial builds a fresh model, lets the :class:`~autonorm.callbacks.AutoNorm` callback (search
mode) rewrite it from the trial's choices, trains it with a Lightning ``Trainer`` and returns the
monitored metric. Trials over the budget end at once and are recorded as infeasible.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import TrialState
from torch import nn

from autonorm import workers
from autonorm._errors import AutoNormError, ConfigError
from autonorm._io import atomic_write, mask_password
from autonorm.budget import Budget, free_memory, is_oom_error
from autonorm.callbacks import AutoNorm
from autonorm.config import NormChoice, NormConfig
from autonorm.report import (
    attach_dashboard_artifacts,
    best_feasible_trial,
    pareto_trials,
    write_report,
    write_summary,
)
from autonorm.search_spaces import SearchSpace, resolve_space
from autonorm.slots import Slot, find_slots
from autonorm.warm_start import narrow_space, params_for

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
#: Secondary objectives of a multi-objective search, minimized.
EXTRA_OBJECTIVES = {"peak_memory": "peak_memory", "latency": "step_time", "params": "n_params"}
METRIC = "metric"
#: Training epochs of a trial when ``trainer_kwargs`` does not say.
DEFAULT_MAX_EPOCHS = 3


@dataclass
class SearchResult:
    """What :func:`search` found.

    Attributes:
        best_config: the best feasible config, or None when no trial met the budget.
        best_value: its metric value (None without a best config).
        best_trial: its Optuna trial.
        study: the ``optuna.Study``.
        out_dir: the export bundle's folder.
        pareto: multi-objective only: ``[(config, values), ...]`` on the Pareto front.
        summary: the machine-readable summary also written to ``summary.json``.
    """

    best_config: NormConfig | None
    best_value: float | None
    best_trial: optuna.trial.FrozenTrial | None
    study: optuna.Study
    out_dir: Path
    pareto: list[tuple[NormConfig, list[float]]] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


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


def _journal_path(storage: Any) -> Path | None:
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
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt == 5:
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
    text = (
        f"sqlite:///{(out_dir / 'study.db').resolve()}" if storage is None else os.fspath(storage)
    )
    if "://" in text:
        url = postgres_driver_url(text)
        kwargs: dict[str, Any] = {}
        if heartbeat_interval is not None and not url.startswith("sqlite"):
            from autonorm.workers import RetryStaleTrial

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
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


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


def _model_factory(model: Any, model_kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    if inspect.isclass(model):
        if not issubclass(model, nn.Module):
            raise ValueError(
                f"`model` must be a LightningModule class or a factory, got class {model.__name__}"
            )
        return lambda: model(**model_kwargs)
    if isinstance(model, nn.Module):
        raise ValueError(
            "`model` must be a LightningModule class or a zero-argument factory, not an instance: "
            "every trial needs a fresh model"
        )
    if callable(model):
        if model_kwargs:
            raise ValueError("`model_kwargs` applies to a model class, not to a factory")
        return model
    raise ValueError(f"`model` must be a LightningModule class or a factory, got {model!r}")


def _datamodule_factory(datamodule: Any) -> Callable[[], Any] | None:
    if datamodule is None:
        return None
    if inspect.isclass(datamodule) or (
        callable(datamodule) and not hasattr(datamodule, "train_dataloader")
    ):
        return datamodule
    return lambda: datamodule


def _set_batch_size(datamodule: Any, loaders: dict[str, Any], batch_size: int) -> None:
    """Train at the budget's per-device batch size: on the datamodule or the dataloaders."""
    if datamodule is not None:
        if hasattr(datamodule, "batch_size"):
            datamodule.batch_size = batch_size
        elif hasattr(datamodule, "hparams") and "batch_size" in datamodule.hparams:
            datamodule.hparams.batch_size = batch_size
        else:
            raise AutoNormError(
                f"budget.batch_size={batch_size} needs {type(datamodule).__name__} to have a "
                "`batch_size` attribute (or hparams entry) that its dataloaders use"
            )
    for key, loader in list(loaders.items()):
        if loader is not None:
            loaders[key] = _rebatch(loader, batch_size, shuffle=key == "train")


def _rebatch(loader: Any, batch_size: int, *, shuffle: bool) -> Any:
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise AutoNormError(
            f"budget.batch_size needs torch DataLoaders (or a datamodule), got {type(loader).__name__}"
        )
    return torch.utils.data.DataLoader(
        loader.dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last or shuffle,  # a last training batch of 1 breaks batch stats
        pin_memory=loader.pin_memory,
    )


def _check_study_compatible(
    study: optuna.Study, params: dict[str, list[str]], directions: list[str]
) -> None:
    """Refuse a space or direction that differs from an existing study's (Optuna would fail later
    with a less clear message, or silently mix two searches)."""
    existing = [d.name.lower() for d in study.directions]
    wanted = [("minimize" if d == "min" else "maximize") for d in directions]
    if study.get_trials(deepcopy=False) and existing != wanted:
        raise AutoNormError(
            f"study {study.study_name!r} has directions {existing}, this search asks for {wanted}; "
            "use another --study_name or the same mode/objectives"
        )
    changed = []
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            if name in params and list(getattr(dist, "choices", ())) != params[name]:
                changed.append(
                    f"{name}: study has {list(dist.choices)}, space gives {params[name]}"
                )
        if changed:
            break
    if changed:
        raise ConfigError(
            f"the search space changed against the existing study {study.study_name!r} (Optuna "
            "cannot change a categorical parameter's choices):\n  "
            + "\n  ".join(changed)
            + "\nUse the same space, or a new study name / out_dir."
        )


def _baseline_params(
    slots: Sequence[Slot], params: dict[str, tuple[list[str], list[str]]]
) -> list[tuple[str, dict[str, str]]]:
    """Warm-start trials: the model's own norms, then well-known uniform configs.

    A baseline is enqueued only where every parameter offers the needed choice.
    """
    by_name = {s.name: s for s in slots}

    def pick(labels: list[str], slot: Slot, family: dict[str, str]) -> str | None:
        if family.get("keep"):
            label = slot.keep_choice().label
            return label if label in labels else None
        wanted = family[slot.layout]
        return next((label for label in labels if _plain_choice(label, wanted)), None)

    families = [
        ("own norms", {"keep": "1"}),
        (
            "uniform:groupnorm/layernorm",
            {"channels_first": "groupnorm", "channels_last": "layernorm"},
        ),
        ("uniform:batchnorm", {"channels_first": "batchnorm", "channels_last": "batchnorm"}),
        ("uniform:layernorm/rmsnorm", {"channels_first": "layernorm", "channels_last": "rmsnorm"}),
    ]
    out: list[tuple[str, dict[str, str]]] = []
    for label, family in families:
        chosen: dict[str, str] = {}
        for param, (labels, names) in params.items():
            picks = {pick(labels, by_name[n], family) for n in names}
            if None in picks or len(picks) != 1:
                break
            chosen[param] = picks.pop()  # type: ignore[assignment]
        else:
            if chosen not in [c for _, c in out]:
                out.append((label, chosen))
    return out


def _plain_choice(label: str, name: str) -> bool:
    """Whether ``label`` is the registry choice ``name`` without a weight-side part."""
    choice = NormChoice.parse(label)
    return choice.name == name and choice.weight is None


def _warm_start_params(
    slots: Sequence[Slot],
    params: dict[str, tuple[list[str], list[str]]],
    budget: Budget | None,
    learned: NormConfig | None,
) -> list[tuple[str, dict[str, str]]]:
    """The warm-start trials in order: own norms, the learned config, the recommended config,
    then the uniform baselines (each once, and only where the space offers it)."""
    from autonorm.recommend import recommend

    baselines = _baseline_params(slots, params)
    out = baselines[:1]
    for label, config in (("learned (SN)", learned), ("recommend", recommend(slots, budget))):
        chosen = None if config is None else params_for(config, slots, params)
        if chosen is not None:
            out.append((label, chosen))
    out.extend(baselines[1:])
    unique: list[tuple[str, dict[str, str]]] = []
    for label, chosen in out:
        if chosen not in [c for _, c in unique]:
            unique.append((label, chosen))
    return unique


def search(
    model: Any,
    datamodule: Any = None,
    *,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    n_trials: int = 20,
    timeout: float | None = None,
    space: Any = "auto",
    budget: Budget | dict[str, Any] | None = None,
    monitor: str = "val_loss",
    mode: str = "min",
    trainer_kwargs: dict[str, Any] | None = None,
    storage: Any = None,
    study_name: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    sampler: Any = "tpe",
    pruner: Any = "median",
    seed: int | None = None,
    warm_start: bool | str = True,
    objectives: Sequence[str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    example_input: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    retrain: bool = False,
    verbose: bool = False,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    heartbeat_interval: float = 10.0,
    grace_period: float | None = None,
    export: bool = True,
) -> SearchResult:
    """Search the per-slot normalization config that optimizes a validation metric.

    Args:
        model: a LightningModule class (instantiated per trial with ``model_kwargs``) or a
            zero-argument factory returning a fresh LightningModule.
        datamodule: a LightningDataModule instance, class or factory.
        train_dataloaders, val_dataloaders: dataloaders, when no datamodule is given.
        n_trials: the total number of finished (complete or pruned) trials the study should
            hold, however many workers share it; a resumed study runs only the missing ones
            (pass a larger number to add trials).
        timeout: stop starting new trials after this many seconds.
        space: search space (preset name, YAML path, dict, :class:`SearchSpace`).
        budget: a :class:`~autonorm.Budget` (or its dict): peak memory per training step,
            per-device batch size the trials train with, parameter count.
        monitor: the logged metric to optimize; ``mode``: ``"min"`` or ``"max"``.
        trainer_kwargs: ``Trainer`` arguments of each trial (default: 3 epochs on CPU, no
            checkpoints).
        storage: None (SQLite ``study.db`` in ``out_dir``), a SQLAlchemy URL (PostgreSQL for
            workers on several machines), a journal file path (several workers on one host),
            or an Optuna storage. Every ``search`` given the same storage and study name joins
            the study as one more worker.
        study_name: study name (default ``autonorm-<ModelClass>``); an existing study resumes.
        out_dir: the bundle folder (default ``./autonorm-runs/<study_name>``).
        sampler: ``"tpe"`` (seeded), ``"random"`` or an Optuna sampler.
        pruner: ``"median"``, ``"hyperband"``, ``"none"`` or an Optuna pruner.
        seed: seed of the sampler and of each trial's training (``seed + trial.number``).
        warm_start: ``True``: the first trials are the model's own norms, the config
            :func:`autonorm.recommend` gives for the budget, and well-known uniform configs, so
            the search never ends worse than the user's starting point. ``"learn"``: first one
            learned-SwitchableNorm run (``max_epochs`` epochs, Sparse SN settings); its derived
            config is enqueued too and each slot's choices are narrowed to those the learned mix
            weighed at least half as much as its favourite. ``False``: no warm start.
        objectives: multi-objective: ``["metric", "peak_memory" | "latency" | "params"]``.
        model_kwargs: init arguments of a model class.
        example_input: input for the slot probe (default: ``example_input_array``).
        include, exclude: glob patterns selecting the slots to search.
        retrain: train the best config once more and save its checkpoint in the bundle.
        verbose: show Lightning's per-trial progress bar and logs.
        callbacks: Optuna callbacks called after each trial (progress displays).
        heartbeat_interval: seconds between the heartbeats of a running trial (user attributes
            ``worker`` and ``heartbeat``; Optuna's heartbeat too on PostgreSQL/MySQL).
        grace_period: seconds without a heartbeat after which a trial counts as lost: it is
            marked FAIL and its parameters run once more (default ``4 * heartbeat_interval``).
        export: write the bundle at the end; False for a worker whose bundle another process
            writes (the result then carries no summary).

    Returns:
        A :class:`SearchResult`.

    Raises:
        ValueError: invalid arguments. AutoNormError: a model without slots, a metric never
            logged, an unusable storage or out_dir.
        KeyboardInterrupt: Ctrl-C or (through the CLI) SIGTERM: the running trial is marked
            FAIL with its ``fail_reason``, its parameters are enqueued to run again, and the
            bundle is written from the trials that exist before the interrupt is re-raised.

    Example::

        >>> # several processes, one study (each one a worker; run them anywhere):
        >>> # autonorm.search(Net, Data(), storage="runs/journal.log", study_name="s", n_trials=40)
    """
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"`n_trials` must be a positive int, got {n_trials!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"`timeout` must be > 0 seconds, got {timeout!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}")
    if not heartbeat_interval > 0:
        raise ValueError(f"`heartbeat_interval` must be > 0 seconds, got {heartbeat_interval!r}")
    grace = 4.0 * heartbeat_interval if grace_period is None else grace_period
    if not grace > heartbeat_interval:
        raise ValueError(
            f"`grace_period` must be longer than `heartbeat_interval`, got grace_period={grace!r}, "
            f"heartbeat_interval={heartbeat_interval!r}"
        )
    objectives = list(objectives) if objectives else [METRIC]
    if (
        objectives[0] != METRIC
        or any(o not in EXTRA_OBJECTIVES for o in objectives[1:])
        or len(set(objectives)) != len(objectives)
    ):
        raise ValueError(
            f"`objectives` must start with 'metric' followed by distinct names from "
            f"{sorted(EXTRA_OBJECTIVES)}, got {objectives}"
        )
    if isinstance(budget, dict):
        budget = Budget(**budget)
    if budget is not None and not isinstance(budget, Budget):
        raise ValueError(
            f"`budget` must be an autonorm.Budget or a dict, got {type(budget).__name__}"
        )
    if datamodule is None and train_dataloaders is None:
        raise ValueError("give a `datamodule` or `train_dataloaders`")
    if warm_start not in (True, False, "learn"):
        raise ValueError(f"`warm_start` must be True, False or 'learn', got {warm_start!r}")
    make_model = _model_factory(model, dict(model_kwargs or {}))
    make_datamodule = _datamodule_factory(datamodule)
    search_space = resolve_space(space).for_budget(budget)
    trainer_kwargs = dict(trainer_kwargs or {})
    max_epochs = int(trainer_kwargs.setdefault("max_epochs", DEFAULT_MAX_EPOCHS))

    probe = make_model()
    model_class = f"{type(probe).__module__}.{type(probe).__qualname__}"
    if example_input is None:
        example_input = getattr(probe, "example_input_array", None)
    slots = find_slots(probe, example_input, include=include, exclude=exclude)
    if not slots:
        raise AutoNormError(f"{type(probe).__name__} has no normalization slot to search")
    search_space.parameters(slots)  # a space that does not fit the model fails here, early
    del probe
    training = _Training(
        make_model,
        make_datamodule,
        train_dataloaders,
        val_dataloaders,
        budget,
        trainer_kwargs,
        example_input,
        include,
        exclude,
        verbose,
    )

    study_name = (
        study_name
        or f"autonorm-{type(make_model).__name__ if not inspect.isclass(model) else model.__name__}"
    )
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "autonorm-runs" / study_name
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / f".write-test-{os.getpid()}"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as err:
        raise AutoNormError(
            f"out_dir {str(out)!r} cannot be written: {err.strerror or err}"
        ) from None

    directions = [mode] + ["min"] * (len(objectives) - 1)
    optuna_directions: list[Any] = ["minimize" if d == "min" else "maximize" for d in directions]
    study_storage = make_storage(
        storage, out, heartbeat_interval=heartbeat_interval, grace_period=grace
    )
    multi = len(objectives) > 1
    try:
        existing = optuna.load_study(study_name=study_name, storage=study_storage)
    except KeyError:
        existing = None
    learned: NormConfig | None = None
    if warm_start == "learn":
        stored = (existing.user_attrs.get("autonorm") or {}) if existing is not None else {}
        if stored.get("learned_config"):  # a resumed study keeps the space its learn pass made
            learned = NormConfig.from_dict(stored["learned_config"])
            search_space = SearchSpace.from_dict(stored["space"])
        else:
            with _quiet_lightning(not verbose):
                learned = _learn_pass(training, out, seed)
            search_space = narrow_space(search_space, slots, learned.metadata["weights"])
    space_params = search_space.parameters(slots)
    labels = {name: choice_labels for name, (choice_labels, _) in space_params.items()}
    if existing is not None:
        _check_study_compatible(existing, labels, directions)
    study, created = _open_study(
        study_storage,
        study_name,
        optuna_directions,
        sampler=make_sampler(sampler, seed),
        pruner=optuna.pruners.NopPruner() if multi else make_pruner(pruner, max_epochs),
        existing=existing,
    )
    study.set_user_attr(
        "autonorm",
        {
            "monitor": monitor,
            "mode": mode,
            "objectives": [monitor if o == METRIC else o for o in objectives],
            "budget": budget.to_dict() if budget is not None else None,
            "space": search_space.to_dict(),
            "model_class": model_class,
            "slots": [
                {"name": s.name, "kind": s.kind, "num_features": s.num_features, "layout": s.layout}
                for s in slots
            ],
            "max_epochs": max_epochs,
            "warm_start": warm_start,
            "learned_config": None if learned is None else learned.to_dict(),
            "learn_epochs": max_epochs if learned is not None else 0,
        },
    )
    if _is_sqlite(study_storage) and workers.live_foreign_trials(study, grace):
        warnings.warn(
            f"another process is running trials of study {study_name!r} in the same SQLite "
            "file: SQLite locks the whole file on every write, which several workers wait on "
            "(or fail with 'database is locked'); give the workers a journal file "
            "(--search.storage path/journal.log) on one host, or PostgreSQL across hosts",
            stacklevel=2,
        )
    if warm_start and created:  # only the worker that created the study: enqueued once
        for label, params in _warm_start_params(slots, space_params, budget, learned):
            study.enqueue_trial(params, user_attrs={"baseline": label})

    claim = workers.claim_lock(study_storage, study_name, _journal_path(storage))
    current: dict[str, optuna.Trial] = {}

    def objective(trial: optuna.Trial) -> float | list[float]:
        claim.release()  # the trial is asked: other workers may claim theirs
        current["trial"] = trial
        with workers.TrialHeartbeat(study, trial, heartbeat_interval):
            try:
                return _run_trial(
                    trial,
                    training,
                    space=search_space,
                    monitor=monitor,
                    objectives=objectives,
                    out_dir=out,
                    seed=seed,
                )
            except (KeyboardInterrupt, SystemExit) as err:
                interrupt = workers.as_interrupt(err)
                if interrupt is None:
                    raise
                trial.set_user_attr(workers.FAIL_REASON_ATTR, _interrupt_reason(interrupt))
                raise interrupt from None  # Optuna marks the trial FAIL and re-raises

    started = time.time()

    def bundle(interrupted: bool = False) -> SearchResult:
        if not export:
            return _result(study, out)
        return export_bundle(
            study,
            out,
            storage=storage,
            budget=budget,
            elapsed=time.time() - started,
            retrain=(
                (lambda cfg: _retrain(cfg, training, out, seed))
                if retrain and not interrupted
                else None
            ),
        )

    try:
        with _quiet_lightning(not verbose):
            ran = _optimize(
                study, objective, claim, current, n_trials, timeout, list(callbacks), grace
            )
    except BaseException as err:
        interrupt = workers.as_interrupt(err) if isinstance(err, KeyboardInterrupt) else None
        _settle_interrupted_trial(study, current.get("trial"), interrupt, err)
        if interrupt is None:
            raise
        log.warning(
            "search of study %r interrupted by %s: writing the bundle from its trials",
            study_name,
            interrupt.signal_name,
        )
        try:
            bundle(interrupted=True)
        except Exception as follow_up:  # e.g. the storage went away: the interrupt still wins
            log.warning("could not write the bundle of study %r: %s", study_name, follow_up)
        raise interrupt from None
    if not ran and timeout is None:
        log.info("study %r already holds its %d finished trials", study_name, n_trials)
    return bundle()


def _is_sqlite(storage: Any) -> bool:
    return str(getattr(storage, "url", "")).startswith("sqlite")


def _open_study(
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


def _optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    claim: Any,
    current: dict[str, optuna.Trial],
    n_trials: int,
    timeout: float | None,
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]],
    grace: float,
) -> int:
    """Run trials until the study holds ``n_trials`` finished ones; return how many ran here.

    Under the claim lock a worker recovers lost trials, then starts a trial only while the
    finished plus running trials are fewer than ``n_trials``; otherwise it waits for the
    running ones (they finish, or are lost and retried). So the study ends with exactly
    ``n_trials`` finished trials and all workers stop together.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    started = time.time()
    ran = 0
    waiting = False
    while timeout is None or time.time() - started < timeout:
        claim.acquire()
        try:
            workers.recover_stale_trials(study, grace)
            trials = study.get_trials(deepcopy=False, states=states)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            finished = len(trials) - running
            if finished >= n_trials:
                break
            if finished + running >= n_trials:
                claim.release()
                if not waiting:
                    log.info("waiting for %d running trials of other workers", running)
                    waiting = True
                time.sleep(min(1.0, grace / 4))
                continue
            waiting = False
            study.optimize(objective, n_trials=1, callbacks=callbacks, catch=())
            current.clear()
            ran += 1
            if getattr(study, "_stop_flag", False):
                break  # a callback's study.stop() ends the search, not just this one-trial loop
        finally:
            claim.release()
    return ran


def _interrupt_reason(interrupt: workers.Interrupted) -> str:
    who = workers.worker_identity()
    return f"interrupted by {interrupt.signal_name} (worker {who['host']}:{who['pid']})"


def _settle_interrupted_trial(
    study: optuna.Study,
    trial: optuna.Trial | None,
    interrupt: workers.Interrupted | None,
    err: BaseException,
) -> None:
    """After the search loop died: the trial it ran must not stay RUNNING; an interrupted
    trial's parameters are enqueued to run again (once)."""
    if trial is None:
        return
    try:
        frozen = workers.fresh_trial(study, trial)
        if frozen.state == TrialState.RUNNING:
            reason = _interrupt_reason(interrupt) if interrupt else f"{type(err).__name__}: {err}"
            workers.fail_trial(study, frozen, reason)
            frozen = workers.fresh_trial(study, trial)
        retry = interrupt is not None and frozen.state == TrialState.FAIL
        if retry and workers.enqueue_retry(study, frozen):
            log.warning("trial %d was interrupted: its parameters run again", frozen.number)
    except Exception as follow_up:  # the storage may be what failed: keep the first error
        log.warning("could not mark trial %d after %r: %s", trial.number, err, follow_up)


@dataclass
class _Training:
    """How every training run of a search is set up: fresh model and data, the budget's
    per-device batch size, the Trainer's trial defaults, the slot selection."""

    make_model: Callable[[], nn.Module]
    make_datamodule: Callable[[], Any] | None
    train_dataloaders: Any
    val_dataloaders: Any
    budget: Budget | None
    trainer_kwargs: dict[str, Any]
    example_input: Any
    include: Any
    exclude: Any
    verbose: bool

    def fit(self, callback: AutoNorm, root: Path, seed: int | None) -> tuple[nn.Module, Any]:
        """Seed, build a fresh model and data, train with ``callback`` first among callbacks."""
        import pytorch_lightning as pl

        if seed is not None:
            pl.seed_everything(seed, workers=True, verbose=False)
        module = self.make_model()
        dm = self.make_datamodule() if self.make_datamodule is not None else None
        loaders = {"train": self.train_dataloaders, "val": self.val_dataloaders}
        if self.budget is not None and self.budget.batch_size is not None:
            _set_batch_size(dm, loaders, self.budget.batch_size)
        kwargs = {
            "accelerator": "auto",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": self.verbose,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(root),
            **self.trainer_kwargs,
        }
        kwargs["callbacks"] = [callback, *self.trainer_kwargs.get("callbacks", [])]
        trainer = pl.Trainer(**kwargs)
        if dm is not None:
            trainer.fit(module, datamodule=dm)
        else:
            trainer.fit(module, train_dataloaders=loaders["train"], val_dataloaders=loaders["val"])
        return module, trainer


def _run_trial(
    trial: optuna.Trial,
    training: _Training,
    *,
    space: SearchSpace,
    monitor: str,
    objectives: list[str],
    out_dir: Path,
    seed: int | None,
) -> float | list[float]:
    callback = AutoNorm(
        trial=trial,
        space=space,
        monitor=monitor,
        include=training.include,
        exclude=training.exclude,
        example_input=training.example_input,
        budget=training.budget,
    )
    try:
        _, trainer = training.fit(
            callback, out_dir / "trials", None if seed is None else seed + trial.number
        )
    except optuna.TrialPruned:
        raise
    except Exception as err:
        if not is_oom_error(err):
            raise
        free_memory()
        callback.mark_infeasible("out of memory during training")
        raise optuna.TrialPruned("out of memory during training") from None
    value = callback.monitored_value(trainer)
    if not math.isfinite(value):
        reason = f"{monitor} is {value} at the end of training"
        trial.set_user_attr("prune_reason", reason)
        raise optuna.TrialPruned(reason)
    if len(objectives) == 1:
        return value
    attrs = callback.recorder.summary() if callback.recorder is not None else {}
    extra = []
    for name in objectives[1:]:
        key = EXTRA_OBJECTIVES[name]
        if key not in attrs:
            raise AutoNormError(f"objective {name!r} was not measured in trial {trial.number}")
        extra.append(float(attrs[key]))
    return [value, *extra]


def _learn_pass(training: _Training, out_dir: Path, seed: int | None) -> NormConfig:
    """One learned-SwitchableNorm run (Sparse SN's settings for the mixing weights): the
    derived config, with the learned weights in its metadata."""
    callback = AutoNorm(
        mode="learn",
        mixing_lr_scale=0.1,
        mixing_weight_decay=0.0,
        include=training.include,
        exclude=training.exclude,
        example_input=training.example_input,
        config_path=out_dir / "learned_config.yaml",
        record_metrics=False,
    )
    training.fit(callback, out_dir / "learn", seed)
    assert callback.config is not None
    return callback.config


def _trial_config(trial: optuna.trial.FrozenTrial, metadata: dict[str, Any]) -> NormConfig:
    return NormConfig(dict(trial.user_attrs["config"]), metadata=metadata)


def _versions() -> dict[str, str]:
    import pytorch_lightning as pl

    from autonorm import __version__

    return {
        "autonorm": __version__,
        "torch": str(torch.__version__),
        "optuna": optuna.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
    }


def _best_of(
    study: optuna.Study,
) -> tuple[
    optuna.trial.FrozenTrial | None,
    NormConfig | None,
    list[tuple[NormConfig, list[float]]] | None,
]:
    """(best trial, best config, None) of a single-objective study, (None, None, Pareto
    front) of a multi-objective one; configs carry the study's metadata."""
    info = dict(study.user_attrs.get("autonorm") or {})
    base_meta = {
        "metric": info.get("monitor"),
        "mode": info.get("mode"),
        "budget": info.get("budget"),
        "space": info.get("space"),
        "model_class": info.get("model_class"),
        "study_name": study.study_name,
        "versions": _versions(),
    }
    if len(study.directions) == 1:
        best = best_feasible_trial(study)
        if best is None:
            return None, None, None
        meta = {**base_meta, "source": "search", "trial": best.number, "value": best.value}
        return best, _trial_config(best, meta), None
    pareto = []
    for trial in pareto_trials(study):
        meta = {**base_meta, "source": "search", "trial": trial.number, "values": trial.values}
        pareto.append((_trial_config(trial, meta), list(trial.values)))
    return None, None, pareto


def _result(study: optuna.Study, out_dir: Path) -> SearchResult:
    """The result of a worker that leaves the bundle to another process."""
    best, best_config, pareto = _best_of(study)
    value = best.value if best is not None else None
    return SearchResult(best_config, value, best, study, Path(out_dir), pareto, {})


@contextlib.contextmanager
def _export_lock(out_dir: Path) -> Iterator[None]:
    """Workers finishing together write one bundle folder in turn, not at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no file locks; the writes themselves are atomic
        yield
        return
    fd = os.open(out_dir / ".export.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def export_bundle(
    study: optuna.Study,
    out_dir: Path,
    *,
    storage: Any = None,
    budget: Budget | None = None,
    elapsed: float | None = None,
    retrain: Callable[[NormConfig], Path] | None = None,
) -> SearchResult:
    """Write ``best_config.yaml``, ``summary.json``, ``report.html``, ``pareto.yaml`` (multi-
    objective), ``storage.txt`` (external storage, its password masked) and the dashboard
    artifacts into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _export_lock(out_dir):
        return _export(study, out_dir, storage=storage, elapsed=elapsed, retrain=retrain)


def _export(
    study: optuna.Study,
    out_dir: Path,
    *,
    storage: Any,
    elapsed: float | None,
    retrain: Callable[[NormConfig], Path] | None,
) -> SearchResult:
    best, best_config, pareto = _best_of(study)
    best_value = best.value if best is not None else None
    written: list[Path] = []
    if best_config is not None:
        path = out_dir / "best_config.yaml"
        best_config.save(path)
        written.append(path)
    if pareto is not None:
        path = out_dir / "pareto.yaml"
        front = [
            {"trial": c.metadata["trial"], "values": v, "config": c.to_dict()} for c, v in pareto
        ]
        atomic_write(path, yaml.safe_dump(front, sort_keys=False))
        written.append(path)
    if storage is not None and not (
        isinstance(storage, str)
        and storage.startswith("sqlite:///")
        and Path(storage[10:]).parent == out_dir
    ):
        text = (
            mask_password(os.fspath(storage))
            if isinstance(storage, (str, os.PathLike))
            else type(storage).__name__
        )
        atomic_write(out_dir / "storage.txt", f"{text}\nstudy_name: {study.study_name}\n")
    if best_config is not None and retrain is not None:
        written.append(retrain(best_config))
    write_summary(study, out_dir, elapsed=elapsed)
    write_report(study, out_dir / "report.html")
    try:
        attach_dashboard_artifacts(study, out_dir, written)
    except Exception as err:  # artifacts are a convenience: never lose the bundle over them
        log.warning("could not attach dashboard artifacts: %s", err)
    if best is None and len(study.directions) == 1:
        log.warning(
            "no trial of study %r met the budget: no best config (see %s)",
            study.study_name,
            out_dir / "report.html",
        )
    summary = json.loads((out_dir / "summary.json").read_text())
    return SearchResult(best_config, best_value, best, study, out_dir, pareto, summary)


def retrain_best(
    config: NormConfig,
    make_model: Callable[[], nn.Module],
    make_datamodule: Callable[[], Any] | None,
    *,
    budget: Budget | None,
    trainer_kwargs: dict[str, Any],
    out_dir: Path,
    seed: int | None,
) -> Path:
    """Train ``config`` once more with a search's trial setup (for a bundle written by another
    process than the trials, e.g. a worker pool's parent); returns the checkpoint's path."""
    kwargs = {"max_epochs": DEFAULT_MAX_EPOCHS, **trainer_kwargs}
    training = _Training(
        make_model, make_datamodule, None, None, budget, kwargs, None, None, None, False
    )
    return _retrain(config, training, out_dir, seed)


def _retrain(config: NormConfig, training: _Training, out_dir: Path, seed: int | None) -> Path:
    """Train the best config once more for the full schedule; save its checkpoint."""
    callback = AutoNorm(config=config, example_input=training.example_input, record_metrics=False)
    _, trainer = training.fit(callback, out_dir / "retrain", seed)
    path = out_dir / "best.ckpt"
    trainer.save_checkpoint(path)
    return path


class _quiet_lightning:
    """Silence Lightning's per-trial info logs (GPU available, ...) unless verbose."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.saved: dict[str, int] = {}

    def __enter__(self) -> None:
        if self.active:
            for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
                logger = logging.getLogger(name)
                self.saved[name] = logger.level
                logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)
