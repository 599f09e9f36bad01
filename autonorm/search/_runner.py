"""``autonorm.search``: per-slot Optuna search under memory and batch budgets, with pruning,
resume, warm start and the export bundle.

Each trial builds a fresh model, lets the :class:`~autonorm.callbacks.AutoNorm` callback (search
mode) rewrite it from the trial's choices, trains it with a Lightning ``Trainer`` and returns the
monitored metric. Trials over the budget end at once and are recorded as infeasible.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from autonorm import _trial_keys as keys
from autonorm._errors import AutoNormError
from autonorm._trial_keys import BASELINE, FAIL_REASON, STUDY_INFO
from autonorm.budget import Budget
from autonorm.callbacks import TrialTask
from autonorm.config import NormChoice, NormConfig
from autonorm.search import _loop as loop
from autonorm.search import _workers as workers
from autonorm.search._export import SearchResult, export_bundle, worker_result
from autonorm.search._fingerprint import experiment_fingerprint
from autonorm.search._plan import Plan, reuse_finished
from autonorm.search._planned import SCREEN, Candidate, continue_values, trial_task
from autonorm.search._ranks import RankLost, follow, is_follower
from autonorm.search._settings import (
    LEARN_MIXINGS,
    METRIC,
    SearchSettings,
    check_trainings_left,
    search_signature,
)
from autonorm.search._storage import (
    check_study_compatible,
    check_study_settings,
    is_sqlite,
    journal_path,
    make_pruner,
    make_sampler,
    make_storage,
    open_study,
)
from autonorm.search._training import (
    Training,
    datamodule_factory,
    learn_pass,
    model_factory,
    retrain,
    run_trial,
    train_job,
)
from autonorm.search._warm_start import (
    DEFAULT_CONFIG,
    GUARDS,
    SUPERNET,
    default_params,
    grid_size,
    random_params,
    warm_start_params,
)
from autonorm.search_spaces import (
    Parameters,
    SearchSpace,
    narrow_space,
    params_for,
    slot_groups,
)
from autonorm.surgery import Slot, find_slots

log = logging.getLogger(__name__)


def search(
    model: Any,
    datamodule: Any = None,
    *,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    settings: SearchSettings | None = None,
    **options: Any,
) -> SearchResult:
    """Search the per-slot normalization config that optimizes a validation metric.

    Each trial builds a fresh model, lets :class:`~autonorm.callbacks.TrialNorms` rewrite it
    from the trial's choices, trains it with a Lightning ``Trainer`` and returns the monitored
    metric; a trial over the budget ends at once and is recorded as infeasible.

    Args:
        model: a LightningModule class (instantiated per trial with ``model_kwargs``) or a
            zero-argument factory returning a fresh LightningModule.
        datamodule: a LightningDataModule instance, class or factory.
        train_dataloaders: the training dataloader, when no datamodule is given.
        val_dataloaders: the validation dataloader(s), when no datamodule is given.
        model_kwargs: init arguments of a model class.
        settings: a :class:`~autonorm.search.SearchSettings`; its fields may also be given one
            by one, as keyword arguments (they replace the ones of ``settings``).
        **options: the fields of :class:`~autonorm.search.SearchSettings` (``n_trials``,
            ``budget``, ``monitor``, ``mode``, ``trainer_kwargs``, ``storage``, ...), each
            documented there once.

    Returns:
        A :class:`SearchResult`.

    Raises:
        TypeError: a keyword argument that is no setting.
        ValueError: invalid arguments. AutoNormError: a model without slots, a metric never
            logged, an unusable storage or out_dir.
        KeyboardInterrupt: Ctrl-C or (through the CLI) SIGTERM: the running trial is marked
            FAIL with its ``fail_reason``, its parameters are enqueued to run again, and the
            bundle is written from the trials that exist before the interrupt is re-raised.

    Example::

        >>> # several processes, one study (each one a worker; run them anywhere):
        >>> # autonorm.search(Net, Data(), storage="runs/journal.log", study_name="s", n_trials=40)
    """
    settings = SearchSettings.build(settings, options)
    if datamodule is None and train_dataloaders is None:
        raise ValueError("give a `datamodule` or `train_dataloaders`")
    training = Training.for_search(
        settings,
        model_factory(model, dict(model_kwargs or {})),
        datamodule_factory(datamodule),
        train_dataloaders,
        val_dataloaders,
    )
    if is_follower():  # a rank of rank 0's trials, started by running this program again
        follow(functools.partial(train_job, training))
    settings = settings.for_devices(training.world)
    training.budget = settings.budget
    try:
        return _search(settings, training, train_dataloaders, val_dataloaders)
    finally:
        training.close()


def _search(
    settings: SearchSettings, training: Training, train_dataloaders: Any, val_dataloaders: Any
) -> SearchResult:
    slots, model_class, probe = _probe_slots(training, settings)
    experiment = experiment_fingerprint(
        training.make_model,
        probe,
        training.make_datamodule,
        {"train": train_dataloaders, "val": val_dataloaders},
        settings.trainer_kwargs,
        budget_batch_size=settings.budget is not None and settings.budget.batch_size is not None,
    )
    del probe
    run = _SearchRun.open(settings, training, slots, model_class, experiment)
    return run.optimize()


# help(autonorm.search) and IDEs show every setting as a keyword argument, with its default
search.__signature__ = search_signature(  # type: ignore[attr-defined]
    inspect.signature(search), SearchResult
)


def _foreign(study: optuna.Study) -> bool:
    """Whether ``study`` has trials but no autonorm record (another tool's: no configs)."""
    return bool(study.get_trials(deepcopy=False)) and STUDY_INFO not in study.user_attrs


def _probe_slots(training: Training, settings: SearchSettings) -> tuple[list[Slot], str, nn.Module]:
    """Find the slots on one fresh model (one probe), check the space fits them; fill in the
    example input the probe used. Returns the slots, the model's class path and the probe."""
    probe = training.make_model()
    model_class = f"{type(probe).__module__}.{type(probe).__qualname__}"
    if training.example_input is None:
        training.example_input = getattr(probe, "example_input_array", None)
    slots = find_slots(
        probe, training.example_input, include=settings.include, exclude=settings.exclude
    )
    if not slots:
        selected = [
            f"{name}={patterns!r}"
            for name, patterns in (("include", settings.include), ("exclude", settings.exclude))
            if patterns
        ]
        raise AutoNormError(
            f"{type(probe).__name__} has no normalization slot to search"
            + (f" selected by {', '.join(selected)}" if selected else "")
        )
    settings.space.parameters(slots)  # a space that does not fit the model fails here, early
    return slots, model_class, probe


@dataclass
class _SearchRun:
    """One process's part of a search: the study it joined, and how it runs trials there."""

    settings: SearchSettings
    training: Training
    study: optuna.Study
    space: SearchSpace
    out: Path
    plan: Plan
    params: Parameters
    #: the workers' claim lock on the study (a trial is asked under it)
    claim: Any
    #: the slots the search chooses for (the probe's)
    slots: list[Slot]
    #: the trial running here, to settle when the loop dies
    current: optuna.Trial | None = None
    started: float = field(default_factory=time.time)

    @classmethod
    def open(
        cls,
        settings: SearchSettings,
        training: Training,
        slots: list[Slot],
        model_class: str,
        experiment: tuple[dict[str, Any], list[str]],
    ) -> _SearchRun:
        """Create or join the study: its storage, its space (narrowed by a learn pass), the
        settings it records, and the warm-start trials when this process created it."""
        study_name = settings.study_name_for(model_class.rsplit(".", 1)[-1])
        out = settings.writable_bundle_dir(study_name)
        storage = make_storage(
            settings.storage,
            out,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace,
        )
        claim = workers.claim_lock(storage, study_name, journal_path(settings.storage))
        # one worker at a time joins or creates the study: one learn pass for all, and settings
        # recorded by one are checked by the next
        with claim:
            try:
                existing: optuna.Study | None = optuna.load_study(
                    study_name=study_name, storage=storage
                )
            except KeyError:
                existing = None
            if existing is not None and _foreign(existing):
                raise AutoNormError(
                    f"study {study_name!r} in this storage was not made by autonorm: give "
                    "another study name (--search.study_name / study_name=...)"
                )
            space, learned = _space_of(settings, training, slots, existing, out)
            params = space.parameters(slots)
            plan = _plan(settings, slots, params, learned)
            info = _study_info(settings, space, slots, model_class, learned, plan)
            info["experiment"], missed = experiment
            if existing is not None:  # every recorded difference in one line, then the trials'
                check_study_settings(existing, info)
                labels = {name: choice_labels for name, (choice_labels, _) in params.items()}
                check_study_compatible(existing, labels, settings.directions)
            study, created = open_study(
                storage,
                study_name,
                ["minimize" if d == "min" else "maximize" for d in settings.directions],
                sampler=make_sampler(settings.sampler, settings.seed),
                pruner=optuna.pruners.NopPruner()
                if settings.multi_objective
                else make_pruner(settings.pruner, settings.max_epochs),
                existing=existing,
            )
            with warnings.catch_warnings():  # the dashboard names the values (val_acc, ...)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([settings.monitor, *settings.objectives[1:]])
            if not created and existing is None:  # created meanwhile by a worker starting alongside
                check_study_settings(study, info)
            study.set_user_attr(STUDY_INFO, info)  # the same defining settings; compute may grow
            if is_sqlite(storage) and workers.live_foreign_trials(study, settings.grace):
                warnings.warn(_SQLITE_SHARED.format(name=study_name), stacklevel=3)
            if created and missed:  # said once, when the study is made
                log.warning(
                    "study %r cannot tell a rerun with other %s: keep them as they are for this "
                    "study (or save the hyperparameters)",
                    study_name,
                    "; ".join(missed),
                )
            if created and settings.seed is None:  # configs still share their k-th run's seed
                study.set_user_attr(keys.RUN_SEED, random.randrange(2**31 - 2**20))
            if created:  # only the worker that created the study plans its first trials
                # rung checkpoints of an earlier study in this folder are not this study's runs
                shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
                if plan.baselines:
                    for step in plan.screen():
                        study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
                else:  # several objectives or no warm start: the baselines, then the sampler
                    for label, chosen in _sampler_baselines(settings, slots, params, learned):
                        attrs = {BASELINE: label, **_guarded(label)}
                        study.enqueue_trial(chosen, user_attrs=attrs)
        return cls(settings, training, study, space, out, plan, params, claim, slots)

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        self.claim.release()  # the trial is asked: other workers may claim theirs
        self.current = trial
        reused = reuse_finished(self.study, trial, self.params)
        if reused is not None:
            return reused
        settings = self.settings
        task = trial_task(
            trial.number,
            trial.user_attrs,
            checkpoints=self.checkpoints,
            base_seed=self.base_seed(),
        )
        if task.resume_from is not None:  # the continued run's epochs, on this trial's curve
            continue_values(self.study, trial)
        with workers.TrialHeartbeat(self.study, trial, settings.heartbeat_interval):
            try:
                values = run_trial(
                    trial,
                    self.training,
                    task=task,
                    space=self.space,
                    monitor=settings.monitor,
                    objectives=settings.objectives,
                    out_dir=self.out,
                )
            except optuna.TrialPruned:
                self._perturb(trial, task)
                raise
            except RankLost as err:  # the loop fails the trial and runs it once more
                trial.set_user_attr(FAIL_REASON, str(err))
                raise
            except (KeyboardInterrupt, SystemExit) as err:
                interrupt = workers.as_interrupt(err)
                if interrupt is None and isinstance(err, SystemExit):  # the user's code exited
                    failure = workers.TrialExit(err.code)
                    trial.set_user_attr(FAIL_REASON, str(failure))
                    raise failure from err
                if interrupt is None:
                    raise
                trial.set_user_attr(FAIL_REASON, loop.interrupt_reason(interrupt))
                raise interrupt from None  # Optuna marks the trial FAIL and re-raises
        if task.resume_from is not None:  # continued to the end: its rung state is spent
            task.resume_from.unlink(missing_ok=True)
        return values

    def _perturb(self, trial: optuna.Trial, task: TrialTask) -> None:
        """After the screened uniform-SwitchableNorm run stopped at its rung: per-slot evidence
        from its model by perturbation (validation passes, no training), recorded on the trial
        for the plan (its config is screened next, and is the first refinement donor)."""
        screened_supernet = trial.user_attrs.get(BASELINE) == SUPERNET and task.stage == SCREEN
        if not screened_supernet or task.checkpoint is None or not task.checkpoint.is_file():
            return
        try:
            evidence = self.training.perturb(
                task.checkpoint,
                self.slots,
                monitor=self.settings.monitor,
                maximize=self.settings.mode == "max",
            )
        except Exception as err:  # evidence is optional: the search goes on without it
            log.warning("trial %d: no per-slot evidence by perturbation: %s", trial.number, err)
            return
        choices = {slot: choice.to_value() for slot, choice in evidence.choices.items()}
        trial.set_user_attr(keys.PERTURBED_CHOICES, choices)
        trial.set_user_attr(keys.PERTURBATION, evidence.record())
        trial.set_user_attr(keys.PERTURBATION_PASSES, evidence.passes)

    @property
    def checkpoints(self) -> Path:
        """The folder of the screened runs' rung checkpoints (removed when the search ends)."""
        return self.out / CHECKPOINTS

    def base_seed(self) -> int:
        """The seed of every config's first run (the k-th run: this plus k)."""
        if self.settings.seed is not None:
            return self.settings.seed
        return int(self.study.user_attrs.get(keys.RUN_SEED, 0))

    def _trial_done(self) -> None:
        self.current = None

    def optimize(self) -> SearchResult:
        """Run trials until the study holds ``n_trials``; write the bundle (also when
        interrupted, before the interrupt is re-raised)."""
        settings = self.settings
        try:
            ran = loop.optimize(
                self.study,
                self.objective,
                self.claim,
                plan=self.plan,
                timeout=settings.timeout,
                callbacks=list(settings.callbacks),
                grace=settings.grace,
                trial_done=self._trial_done,
            )
        except BaseException as err:
            interrupt = workers.as_interrupt(err) if isinstance(err, KeyboardInterrupt) else None
            loop.settle_interrupted_trial(self.study, self.current, interrupt, err)
            if interrupt is None:
                raise
            self._bundle_after(interrupt)
            raise interrupt from None
        if not ran and settings.timeout is None:
            log.info("study %r has already run what it was asked to", self.study.study_name)
        if settings.timeout is None:  # the plan is done: no promotion will continue a screen
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        return self.bundle()

    def bundle(self, interrupted: bool = False) -> SearchResult:
        settings = self.settings
        if not settings.export:
            return worker_result(self.study, self.out)
        retrain_best: Callable[[NormConfig], Path] | None = None
        if settings.retrain and not interrupted:

            def retrain_best(config: NormConfig) -> Path:
                return retrain(config, self.training, self.out, settings.seed)

        return export_bundle(
            self.study,
            self.out,
            storage=settings.storage,
            elapsed=time.time() - self.started,
            retrain=retrain_best,
        )

    def _bundle_after(self, interrupt: workers.Interrupted) -> None:
        name = self.study.study_name
        log.warning(
            "search of study %r interrupted by %s: writing the bundle from its trials",
            name,
            interrupt.signal_name,
        )
        try:
            self.bundle(interrupted=True)
        except Exception as follow_up:  # e.g. the storage went away: the interrupt still wins
            log.warning("could not write the bundle of study %r: %s", name, follow_up)


#: The run folder's subfolder of the screened runs' rung checkpoints.
CHECKPOINTS = "checkpoints"

_SQLITE_SHARED = (
    "another process is running trials of study {name!r} in the same SQLite file: SQLite "
    "locks the whole file on every write, which several workers wait on (or fail with "
    "'database is locked'); give the workers a journal file (--search.storage "
    "path/journal.log) on one host, or PostgreSQL across hosts"
)


def _space_of(
    settings: SearchSettings,
    training: Training,
    slots: list[Slot],
    existing: optuna.Study | None,
    out: Path,
) -> tuple[SearchSpace, NormConfig | None]:
    """The space the trials sample, and the learned config of a learned warm start: a resumed
    study keeps the space its learn pass made; a new one runs the learn pass here."""
    mixing = LEARN_MIXINGS.get(str(settings.warm_start))
    if mixing is None:
        return settings.space, None
    stored = (existing.user_attrs.get(STUDY_INFO) or {}) if existing is not None else {}
    if stored.get("learned_config"):
        return SearchSpace.from_dict(stored["space"]), NormConfig.from_dict(
            stored["learned_config"]
        )
    learned = learn_pass(training, out, settings, mixing)
    return narrow_space(settings.space, slots, learned.learned_weights), learned


def _study_info(
    settings: SearchSettings,
    space: SearchSpace,
    slots: Sequence[Slot],
    model_class: str,
    learned: NormConfig | None,
    plan: Plan,
) -> dict[str, Any]:
    """The settings a study records (``study.user_attrs["autonorm"]``)."""
    budget: Budget | None = settings.budget
    return {
        "monitor": settings.monitor,
        "mode": settings.mode,
        "objectives": [settings.monitor if o == METRIC else o for o in settings.objectives],
        "budget": budget.to_dict() if budget is not None else None,
        "space": space.to_dict(),
        "model_class": model_class,
        # each slot's probe record: the exported configs carry it (NormConfig.with_probe)
        "slots": [{"name": s.name, "kind": s.kind, **s.record().to_value()} for s in slots],
        "max_epochs": settings.max_epochs,
        "warm_start": settings.warm_start,
        "default_config": None
        if settings.default_config is None
        else {slot: c.to_value() for slot, c in settings.default_config.choices.items()},
        "learned_config": None if learned is None else learned.to_dict(),
        "learn_epochs": plan.learn_epochs,
        "staged": bool(plan.baselines),
        "rung_epochs": plan.rung,
        "budget_epochs": plan.budget_epochs,
    }


def _sampler_baselines(
    settings: SearchSettings,
    slots: Sequence[Slot],
    params: Parameters,
    learned: NormConfig | None,
) -> list[tuple[str, dict[str, str]]]:
    """What a search without a staged plan enqueues before its sampler: the warm start's
    baselines (up to ``n_trials``), or without a warm start the user's default config alone."""
    default = settings.default_config
    if settings.warm_start:
        baselines = warm_start_params(slots, params, settings.budget, learned, default)
        return baselines[: settings.n_trials]
    return [] if default is None else [(DEFAULT_CONFIG, default_params(default, slots, params))]


def _guarded(label: str) -> dict[str, int]:
    """The guard attribute of a baseline the search keeps without evidence (else none)."""
    return {keys.INCUMBENT: GUARDS[label]} if label in GUARDS else {}


def _plan(
    settings: SearchSettings,
    slots: Sequence[Slot],
    params: Parameters,
    learned: NormConfig | None,
) -> Plan:
    """The plan of the study's trials: staged with a warm start on one objective; its caps
    (``n_trials``, the budget's trainings, by default the size of the grid of baselines)."""
    baselines = warm_start_params(slots, params, settings.budget, learned, settings.default_config)
    staged = bool(settings.warm_start) and not settings.multi_objective
    explore = []
    if staged:  # as many random per-slot configs again, screened after the baselines
        taken = [chosen for _, chosen in baselines]
        explore = random_params(params, len(baselines), settings.seed, taken)
    trainings, n_trials = settings.budget_trainings, settings.n_trials
    if trainings is None and n_trials is None:  # the compute of the grid a user runs by hand
        trainings = float(grid_size(slots, params))
        check_trainings_left(trainings, settings.reserved_trainings, "the default budget (grid)")

    def mixed_params(mixed: Mapping[str, Any]) -> dict[str, str]:
        config = NormConfig({slot: NormChoice.parse(value) for slot, value in mixed.items()})
        return params_for(config, slots, params, partial=True) or {}

    names = {p: set(slot_names) for p, (_, slot_names) in params.items()}
    groups = {
        group: [p for p, slot_names in names.items() if slot_names & set(members)]
        for group, members in slot_groups([s.name for s in slots]).items()
    }
    return Plan(
        max_epochs=settings.max_epochs,
        budget_epochs=None if trainings is None else trainings * settings.max_epochs,
        n_trials=n_trials,
        learn_epochs=settings.max_epochs if learned is not None else 0,
        retrain_epochs=settings.max_epochs if settings.retrain and settings.export else 0,
        maximize=settings.mode == "max",
        baselines=[
            Candidate(label, chosen, incumbent=GUARDS.get(label, 0))
            for label, chosen in baselines + explore
        ]
        if staged
        else [],
        explore=len(explore),
        extra_screens=int(staged and any(label == SUPERNET for label, _ in baselines)),
        groups=groups,
        learned=None if learned is None else params_for(learned, slots, params),
        mixed_params=mixed_params,
    )
