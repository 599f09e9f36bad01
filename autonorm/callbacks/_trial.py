"""Drive an Optuna trial: :class:`TrialNorms`, and the functions it delegates to.

One trial is one training run: the per-slot choices are suggested from the
trial (on rank 0, then broadcast), the monitored metric is reported after every validation and
the trial pruned when the pruner says so or the metric is not finite, a run over the budget is
marked infeasible (an Optuna constraint the samplers read), and the measurements are recorded
as trial attributes. The search hands the run a :class:`TrialTask` (where it stops, whether the
pruner may stop it) and reads its end as a :class:`TrialOutcome`.

The functions take the trainer only for its rank, its broadcast and its logged metrics.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from torch import nn
from typing_extensions import Unpack, override

from autonorm import _trial_keys as keys
from autonorm._errors import AutoNormError
from autonorm._lightning import (
    broadcast,
    is_global_zero,
    is_oom_error,
    reduce_over_ranks,
    reseed,
    world_size,
)
from autonorm.callbacks._measure import Measurements, first_batch_size
from autonorm.callbacks._rewrite import AutoNorm, RewriteOptions
from autonorm.config import NormChoice, NormConfig
from autonorm.search_spaces import SearchSpace, resolve_space
from autonorm.surgery import Slot, apply_config, switchable_choices

if TYPE_CHECKING:
    import optuna
    from pytorch_lightning import LightningModule, Trainer

#: Why a trial that ran out of memory is infeasible (the runner's ``TrialPruned`` says the same).
OOM_REASON = "out of memory during training"
#: Torch's error for batch statistics over a single value per channel (a batch of one sample
#: through BatchNorm over (N, C)).
_SMALL_BATCH_ERROR = "Expected more than 1 value per channel"


@dataclass(frozen=True)
class TrialTask:
    """What the search asks of one trial's training run (the staged plan's side of the seam).

    Attributes:
        stage: the stage of the staged search that planned the trial; None for a trial the
            sampler proposed (or a user's own study).
        stop_after: the run stops after this many epochs (a screening rung: its last value is
            a low-fidelity result and the trial is recorded PRUNED); None: the full schedule.
        prunable: whether the study's pruner may stop the run early (a planned run stops where
            the plan says, at its rung or at the end of the schedule).
        seed: the run's seed: every epoch starts from generator states drawn from ``(seed,
            epoch)`` alone, so the data order and dropout of an epoch do not depend on how the
            run got there, and a run continued from a checkpoint repeats a run from scratch.
        checkpoint: where a run that stops at its rung saves its state (the promotion that
            continues it resumes there); None: nothing is saved.
        resume_from: the checkpoint this run continues (the rung checkpoint of the screened
            run it promotes); None: from scratch.
    """

    stage: str | None = None
    stop_after: int | None = None
    prunable: bool = True
    seed: int | None = None
    checkpoint: Path | None = None
    resume_from: Path | None = None

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"`stop_after` must be >= 1 epoch, got {self.stop_after}")


def epoch_seed(seed: int, epoch: int) -> int:
    """The generators' seed at the start of ``epoch`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + epoch) % 2**31


@dataclass(frozen=True)
class TrialOutcome:
    """What a finished training run gives the trial runner.

    Attributes:
        value: the monitored metric's last value (finite).
        measurements: the step recorder's summary (``n_params``, ``peak_memory``,
            ``step_time``, ``memory_method``, ...); empty without ``record_metrics``.
    """

    value: float
    measurements: Measurements


def suggest_config(
    trial: optuna.Trial, space: SearchSpace, slots: Sequence[Slot], trainer: Trainer
) -> NormConfig:
    """One categorical parameter per slot (or tied group), named by the slot, suggested on
    rank 0 and broadcast; the config is recorded on the trial."""
    params = space.parameters(slots)
    chosen: dict[str, str] | None = None
    if is_global_zero(trainer):
        chosen = {
            name: trial.suggest_categorical(name, labels) for name, (labels, _) in params.items()
        }
    chosen = broadcast(trainer, chosen)
    assert chosen is not None
    choices = {
        slot: NormChoice.parse(chosen[name])
        for name, (_, names) in params.items()
        for slot in names
    }
    config = NormConfig(
        choices, metadata={"source": "trial", "space": space.to_dict(), "trial": trial.number}
    ).with_probe(slots)
    if is_global_zero(trainer):
        trial.set_user_attr(keys.CONFIG, {k: v.to_value() for k, v in config.choices.items()})
    return config


def record_switchable_choices(trial: optuna.Trial, choices: Mapping[str, NormChoice]) -> None:
    """Record the choices the trial's SwitchableNorm layers weigh highest, per slot."""
    trial.set_user_attr(keys.SWITCHABLE_CHOICES, {k: v.to_value() for k, v in choices.items()})


def record_measurements(trial: optuna.Trial, measurements: Measurements) -> None:
    """Every measurement as a trial attribute."""
    for key, value in measurements.items():
        trial.set_user_attr(key, value)


def mark_infeasible(trial: optuna.Trial, reason: str, measurements: Measurements) -> None:
    """Record on the trial that it broke the budget (a constraint Optuna's samplers read)."""
    record_measurements(trial, measurements)
    trial.set_user_attr(keys.FEASIBLE, False)
    trial.set_user_attr(keys.INFEASIBLE_REASON, reason)
    trial.set_user_attr(keys.PRUNE_REASON, f"infeasible: {reason}")
    trial.set_constraint(keys.BUDGET_CONSTRAINT, 1.0)


class RankTrial:
    """The trial as the ranks other than 0 of a distributed training hold it: its number. What
    they would record stays unrecorded (rank 0 records the same); they have no storage to read,
    and every read (the trial's attributes, a suggestion, a report) happens on rank 0."""

    def __init__(self, number: int) -> None:
        self.number = number

    def set_user_attr(self, key: str, value: Any) -> None:
        pass

    def set_constraint(self, key: str, value: float) -> None:
        pass

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__") or name == "number":  # copy and pickle look for these
            raise AttributeError(name)
        raise AutoNormError(
            f"trial.{name} is read on rank 0 only (this is another rank of trial {self.number})"
        )


def monitored_value(trainer: Trainer, monitor: str, samples: int = 1) -> float:
    """The monitored metric's last value; in a distributed training (a collective: every rank
    calls it) the mean of the ranks' values weighted by the ``samples`` each one validated: the
    value over the whole validation set, whether or not the metric was logged with
    ``sync_dist`` (a synced value is the same on every rank, and stays).

    Raises:
        AutoNormError: the metric was never logged (names the metrics that were).
    """
    metrics = trainer.callback_metrics
    if monitor not in metrics:
        raise AutoNormError(
            f"monitor {monitor!r} was never logged; logged metrics: "
            f"{sorted(metrics) or 'none'} (log it with self.log({monitor!r}, ...) in "
            "validation_step)"
        )
    value = float(metrics[monitor])
    if world_size(trainer) > 1:
        weight = float(max(samples, 1))  # a metric of no validation: the ranks weigh alike
        weighted, total = reduce_over_ranks(trainer, [value * weight, weight])
        value = weighted / total
    return value


def _epoch_verdict(
    trial: optuna.Trial, task: TrialTask, value: float, epoch: int, monitor: str
) -> tuple[str | None, bool]:
    """Report ``value`` for ``epoch``; why the trial stops here (or None), and whether it stops
    because it reached its rung.

    A run that stops at its rung (:attr:`TrialTask.stop_after`) is a low-fidelity evaluation,
    recorded as PRUNED with its value as the last intermediate value.
    """
    if not math.isfinite(value):
        return f"{monitor} is {value} at epoch {epoch}", False
    if len(trial.study.directions) == 1:  # Optuna cannot prune multi-objective studies
        trial.report(value, step=epoch)
        if task.stop_after is not None and epoch + 1 >= task.stop_after:
            return f"screened: stopped at its rung of {task.stop_after} epoch(s)", True
        if task.prunable and trial.should_prune():
            pruner = type(getattr(trial.study, "pruner", None)).__name__
            return f"pruned by {pruner} at epoch {epoch}", False
    return None, False


def report_epoch(
    trial: optuna.Trial,
    task: TrialTask,
    trainer: Trainer,
    value: float,
    monitor: str,
    measurements: Measurements,
    epochs_trained: int | None = None,
) -> None:
    """After a validation: report the metric's ``value`` (rank 0), record the epochs trained
    (a continued run trains only the rest; default: every epoch up to this one) and the
    measurements, and prune on every rank when rank 0 says so. A run that reached its rung
    saves its checkpoint first.

    Raises:
        optuna.TrialPruned: the pruner pruned the trial, the run reached its rung or the metric
            is not finite.
        AutoNormError: the metric was never logged.
    """
    epoch = trainer.current_epoch
    verdict: tuple[str | None, bool] = (None, False)
    if is_global_zero(trainer):
        verdict = _epoch_verdict(trial, task, value, epoch, monitor)
        trained = epoch + 1 if epochs_trained is None else epochs_trained
        trial.set_user_attr(keys.EPOCHS, trained)
        record_measurements(trial, measurements)
    reason, at_rung = broadcast(trainer, verdict)
    if reason is None:
        return
    if at_rung and task.checkpoint is not None:
        save_checkpoint(trainer, task.checkpoint)
    import optuna

    if is_global_zero(trainer):
        trial.set_user_attr(keys.PRUNE_REASON, reason)
    raise optuna.TrialPruned(f"Trial was pruned: {reason}.")


def save_checkpoint(trainer: Trainer, path: Path) -> None:
    """The run's full state (model, optimizers, schedulers, loops, callbacks) at ``path``,
    written beside it first: a crash mid-write never leaves a broken checkpoint to continue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    trainer.save_checkpoint(partial)
    if is_global_zero(trainer):
        os.replace(partial, path)


def infeasible_reason(err: BaseException) -> str | None:
    """Why a training that failed with ``err`` makes its trial infeasible, or None (an error
    of the user's code): out of memory, or a batch too small for batch statistics."""
    if is_oom_error(err):
        return OOM_REASON
    if isinstance(err, ValueError) and _SMALL_BATCH_ERROR in str(err):
        return (
            "a training batch too small for batch statistics (BatchNorm over (N, C) needs more "
            f"than 1 sample): {str(err).splitlines()[0]}"
        )
    return None


def trial_outcome(
    trial: optuna.Trial | None, value: float, monitor: str, measurements: Measurements
) -> TrialOutcome:
    """The finished run's :class:`TrialOutcome`, the monitored metric's last ``value``.

    Raises:
        optuna.TrialPruned: the value is not finite (the reason is recorded on the trial).
    """
    if not math.isfinite(value):
        import optuna

        reason = f"{monitor} is {value} at the end of training"
        if trial is not None:
            trial.set_user_attr(keys.PRUNE_REASON, reason)
        raise optuna.TrialPruned(reason)
    return TrialOutcome(value=value, measurements=dict(measurements))


class TrialNorms(AutoNorm, mode="search"):
    """Take each slot's choice from an Optuna trial, report the metric, prune.

    One categorical parameter per slot (or tied group), named by the slot, so the dashboard
    reads like the model. After every validation the monitored metric is reported and the
    trial pruned when the pruner says so, when the run reaches the rung its ``task`` stops at,
    or when the metric is not finite; a run over the budget is pruned as infeasible.

    Args:
        trial: an ``optuna.Trial``.
        space: the search space: a preset name, a YAML path, a dict or a
            :class:`~autonorm.search_spaces.SearchSpace`.
        monitor: the metric reported to the trial after every validation.
        task: what the search asks of this run (default: the full schedule, prunable).
        **options: ``include``, ``exclude``, ``example_input``, ``config_path``,
            ``record_metrics``, ``budget``: as :class:`~autonorm.callbacks.AutoNorm`.

    Raises:
        ValueError: invalid arguments.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        *,
        space: str | os.PathLike[str] | Mapping[str, Any] | SearchSpace = "auto",
        monitor: str = "val_loss",
        task: TrialTask | None = None,
        **options: Unpack[RewriteOptions],
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a metric name, got {monitor!r}")
        super().__init__(**options)
        self.trial = trial
        self.monitor = monitor
        self.task = task if task is not None else TrialTask()
        self._first_epoch: int | None = None  # the epoch of the run's first training batch
        self._validated = 0  # samples this rank validated in the last validation
        self._last_value: float | None = None  # the metric at the end of training, all ranks'
        # syncbatchnorm only where the budget has several devices
        self.space: SearchSpace = resolve_space(space).for_budget(self.budget)

    @override
    def _rewrite(
        self, trainer: Trainer, pl_module: nn.Module, found: list[Slot], example: Any
    ) -> None:
        self.config = suggest_config(self.trial, self.space, self.slots, trainer)
        apply_config(
            pl_module, self.config, partial=self.selective, example_input=example, slots=found
        )

    @override
    def for_ranks(self) -> TrialNorms:
        copied = copy.copy(self)
        copied.trial = RankTrial(self.trial.number)  # type: ignore[assignment]
        return copied

    @override
    def _check_params(self, trainer: Trainer, n_params: int) -> None:
        if is_global_zero(trainer):
            self.trial.set_user_attr(keys.N_PARAMS, n_params)
        super()._check_params(trainer, n_params)

    @override
    def _over_budget(self, reason: str) -> NoReturn:
        import optuna

        mark_infeasible(self.trial, reason, self.measurements())
        raise optuna.TrialPruned(f"Trial is infeasible: {reason}.")

    @override
    def _observe_batch_size(self, trainer: Trainer, size: int) -> None:
        if is_global_zero(trainer):
            self.trial.set_user_attr(keys.BATCH_SIZE, size)
        super()._observe_batch_size(trainer, size)

    @override
    def _resumed(self, trainer: Trainer) -> None:
        # the trial records its (enqueued) parameters as a run from scratch does
        self.config = suggest_config(self.trial, self.space, self.slots, trainer)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._first_epoch is None:  # > 0 when the run continues a checkpoint
            self._first_epoch = trainer.current_epoch

    def _epochs_trained(self, trainer: Trainer) -> int:
        """Epochs this run trained (a continued run's restored epochs are not its own)."""
        first = self._first_epoch
        return 0 if first is None else trainer.current_epoch + 1 - first

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.task.seed is not None:  # before the epoch's data iterator draws its order
            reseed(epoch_seed(self.task.seed, trainer.current_epoch))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # every epoch trained counts, also those without a validation (check_val_every_n_epoch)
        if is_global_zero(trainer) and self._first_epoch is not None:
            self.trial.set_user_attr(keys.EPOCHS, self._epochs_trained(trainer))

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validated = 0

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._validated += first_batch_size(batch) or 1

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if is_global_zero(trainer):
            # free per-slot evidence for the staged plan's refinement: what the trial's
            # SwitchableNorm layers weigh highest so far (a screened trial stops at its rung)
            mixed = switchable_choices(pl_module, self.slots)
            if mixed:
                record_switchable_choices(self.trial, mixed)
        report_epoch(
            self.trial,
            self.task,
            trainer,
            monitored_value(trainer, self.monitor, self._validated),
            self.monitor,
            self.measurements(),
            self._epochs_trained(trainer),
        )

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        reason = infeasible_reason(exception)
        if reason is not None:
            mark_infeasible(self.trial, reason, self.measurements())

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # while the ranks are still together (Lightning tears the strategy down before
        # on_fit_end): the final value over every rank's validation samples
        if world_size(trainer) > 1 and self.monitor in trainer.callback_metrics:
            self._last_value = monitored_value(trainer, self.monitor, self._validated)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if is_global_zero(trainer):
            record_measurements(self.trial, self.measurements())
        super().on_fit_end(trainer, pl_module)

    def outcome(self, trainer: Trainer) -> TrialOutcome:
        """The finished run for the trial runner: the monitored metric and the measurements.

        Raises:
            optuna.TrialPruned: the metric's last value is not finite (the reason is recorded
                on the trial).
            AutoNormError: the metric was never logged.
        """
        value = self._last_value  # on several ranks: all ranks' value at the training's end
        if value is None:
            value = monitored_value(trainer, self.monitor)
        return trial_outcome(self.trial, value, self.monitor, self.measurements())
