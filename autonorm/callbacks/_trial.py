"""The AutoNorm callback's side of an Optuna trial.

Search mode turns one trial into one training run: the per-slot choices are suggested from the
trial (on rank 0, then broadcast), the monitored metric is reported after every validation and
the trial pruned when the pruner says so or the metric is not finite, a run over the budget is
marked infeasible (an Optuna constraint the samplers read), and the measurements are recorded
as trial attributes. The trial runner reads the end of the run as a :class:`TrialOutcome`.

The functions take the trainer only for its rank, its broadcast and its logged metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from autonorm import _trial_keys as keys
from autonorm._errors import AutoNormError
from autonorm.config import NormChoice, NormConfig
from autonorm.search_spaces import SearchSpace
from autonorm.surgery import Slot

if TYPE_CHECKING:
    import optuna

#: Why a trial that ran out of memory is infeasible (the runner's ``TrialPruned`` says the same).
OOM_REASON = "out of memory during training"


@dataclass(frozen=True)
class TrialOutcome:
    """What a finished training run gives the trial runner.

    Attributes:
        value: the monitored metric's last value (finite).
        measurements: the step recorder's summary (``n_params``, ``peak_memory``,
            ``step_time``, ``memory_method``, ...); empty without ``record_metrics``.
    """

    value: float
    measurements: dict[str, Any]


def is_global_zero(trainer: Any) -> bool:
    """Whether this process is rank 0 (the one that talks to the trial)."""
    return bool(getattr(trainer, "is_global_zero", True))


def broadcast(trainer: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process)."""
    strategy = getattr(trainer, "strategy", None)
    if getattr(trainer, "world_size", 1) > 1 and strategy is not None:
        return strategy.broadcast(value, src=0)
    return value


def suggest_config(
    trial: optuna.Trial, space: SearchSpace, slots: Sequence[Slot], trainer: Any
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


def record_measurements(trial: optuna.Trial, measurements: Mapping[str, Any]) -> None:
    """Every measurement as a trial attribute."""
    for key, value in measurements.items():
        trial.set_user_attr(key, value)


def mark_infeasible(trial: optuna.Trial, reason: str, measurements: Mapping[str, Any]) -> None:
    """Record on the trial that it broke the budget (a constraint Optuna's samplers read)."""
    record_measurements(trial, measurements)
    trial.set_user_attr(keys.FEASIBLE, False)
    trial.set_user_attr(keys.INFEASIBLE_REASON, reason)
    trial.set_user_attr(keys.PRUNE_REASON, f"infeasible: {reason}")
    trial.set_constraint(keys.BUDGET_CONSTRAINT, 1.0)


def stop_infeasible(
    trial: optuna.Trial | None, reason: str, measurements: Mapping[str, Any]
) -> NoReturn:
    """End a run over the budget: prune the trial as infeasible, or without a trial raise.

    Raises:
        optuna.TrialPruned: with a trial.
        AutoNormError: without one.
    """
    if trial is None:
        raise AutoNormError(f"over budget: {reason}")
    import optuna

    mark_infeasible(trial, reason, measurements)
    raise optuna.TrialPruned(f"Trial is infeasible: {reason}.")


def first_batch_size(batch: Any) -> int | None:
    """The number of samples of a batch: the leading size of its first tensor, or None."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    items = list(batch.values()) if isinstance(batch, Mapping) else batch
    if isinstance(items, (list, tuple)):
        for item in items:
            size = first_batch_size(item)
            if size is not None:
                return size
    return None


def _train_samples(trainer: Any) -> int | None:
    try:
        return len(trainer.train_dataloader.dataset)
    except (AttributeError, TypeError):
        return None


def observe_batch_size(
    trial: optuna.Trial | None, trainer: Any, batch: Any, expected: int | None
) -> None:
    """Record the size of the first training batch on the trial; check it against the budget.

    Raises:
        AutoNormError: the loaders train at another size than ``budget.batch_size`` (they
            ignore the size autonorm set), naming both sizes.
    """
    size = first_batch_size(batch)
    if size is None:
        return
    if trial is not None and is_global_zero(trainer):
        trial.set_user_attr(keys.BATCH_SIZE, size)
    if expected is None or size == expected:
        return
    samples = _train_samples(trainer)
    if size < expected and samples is not None and size >= samples:
        return  # a dataset smaller than one batch
    raise AutoNormError(
        f"budget.batch_size={expected} but the first training batch holds {size} samples: the "
        "dataloaders ignore the batch size autonorm set (a datamodule's loaders must read its "
        "`batch_size` attribute or `hparams.batch_size`)"
    )


def monitored_value(trainer: Any, monitor: str) -> float:
    """The monitored metric's last value.

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
    return float(metrics[monitor])


#: Stages of the staged search whose trials the pruner never stops: they were chosen to run the
#: full schedule (a promoted candidate, a re-evaluation with another seed).
UNPRUNED_STAGES = ("promote", "confirm")


def _epoch_verdict(trial: optuna.Trial, value: float, epoch: int, monitor: str) -> str | None:
    """Report ``value`` for ``epoch``; why the trial stops here, or None.

    A screening trial (``rung_epochs`` user attribute) stops at its rung: a low-fidelity
    evaluation, recorded as PRUNED with its value as the last intermediate value.
    """
    if not math.isfinite(value):
        return f"{monitor} is {value} at epoch {epoch}"
    if len(trial.study.directions) == 1:  # Optuna cannot prune multi-objective studies
        trial.report(value, step=epoch)
        rung = trial.user_attrs.get(keys.RUNG_EPOCHS)
        if rung is not None and epoch + 1 >= rung:
            return f"screened: stopped at its rung of {rung} epoch(s)"
        if trial.user_attrs.get(keys.STAGE) in UNPRUNED_STAGES:
            return None
        if trial.should_prune():
            pruner = type(getattr(trial.study, "pruner", None)).__name__
            return f"pruned by {pruner} at epoch {epoch}"
    return None


def report_epoch(
    trial: optuna.Trial, trainer: Any, monitor: str, measurements: Mapping[str, Any]
) -> None:
    """After a validation: report the metric (rank 0), record the epochs trained and the
    measurements, and prune on every rank when rank 0 says so.

    Raises:
        optuna.TrialPruned: the pruner pruned the trial or the metric is not finite.
        AutoNormError: the metric was never logged.
    """
    epoch = trainer.current_epoch
    reason = None
    if is_global_zero(trainer):
        reason = _epoch_verdict(trial, monitored_value(trainer, monitor), epoch, monitor)
        trial.set_user_attr(keys.EPOCHS, epoch + 1)
        record_measurements(trial, measurements)
    reason = broadcast(trainer, reason)
    if reason is not None:
        import optuna

        if is_global_zero(trainer):
            trial.set_user_attr(keys.PRUNE_REASON, reason)
        raise optuna.TrialPruned(f"Trial was pruned: {reason}.")


def trial_outcome(
    trial: optuna.Trial | None, trainer: Any, monitor: str, measurements: Mapping[str, Any]
) -> TrialOutcome:
    """The finished run's :class:`TrialOutcome`.

    Raises:
        optuna.TrialPruned: the metric's last value is not finite (the reason is recorded on
            the trial).
        AutoNormError: the metric was never logged.
    """
    value = monitored_value(trainer, monitor)
    if not math.isfinite(value):
        import optuna

        reason = f"{monitor} is {value} at the end of training"
        if trial is not None:
            trial.set_user_attr(keys.PRUNE_REASON, reason)
        raise optuna.TrialPruned(reason)
    return TrialOutcome(value=value, measurements=dict(measurements))
