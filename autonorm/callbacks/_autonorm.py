"""The AutoNorm Lightning callback: learned Switchable Norm, trial-driven search, fixed configs.

The callback is thin: it validates in ``__init__``, rewrites the model in ``setup`` (the last hook
before ``configure_optimizers``, the move to the device and the DDP wrap) and delegates: the
rewrite to :mod:`autonorm.surgery` (which works without Lightning), the Optuna trial to
:mod:`autonorm.callbacks._trial`, checkpoints to :mod:`autonorm.callbacks._checkpoints`, the mixing
weights' param group to :mod:`autonorm.callbacks._optimizers`, BatchNorm recalibration to
:mod:`autonorm.surgery._recalibrate`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from autonorm import _trial_keys as keys
from autonorm._errors import AutoNormError
from autonorm._lightning import callback_bases, is_oom_error
from autonorm.budget import Budget, as_budget, format_bytes
from autonorm.callbacks import _trial as trial_glue
from autonorm.callbacks._checkpoints import (
    CHECKPOINT_KEY,
    checkpoint_entry,
    structure_from_checkpoint,
)
from autonorm.callbacks._measure import TrainingStepRecorder
from autonorm.callbacks._optimizers import wrap_configure_optimizers
from autonorm.callbacks._ssn import RadiusSchedule, sparse_layers
from autonorm.callbacks._trial import TrialOutcome
from autonorm.config import NormConfig
from autonorm.norms import SWITCHABLE_MIXINGS
from autonorm.search_spaces import SearchSpace, resolve_space
from autonorm.surgery import (
    SWITCHABLE_INITS,
    Slot,
    apply_config,
    default_calibration_forward,
    derive_config,
    find_slots,
    recalibrate_batchnorm,
    select_slots,
    slot_batchnorms,
    switchable_choices,
    switchable_layers,
    to_switchable,
)

if TYPE_CHECKING:
    from pytorch_lightning import Callback as _CallbackType
else:
    _CallbackType = object  # the real bases come per installed Lightning namespace, below

log = logging.getLogger(__name__)

MODES = ("learn", "search", "fixed")
#: Callbacks known to copy the model in their own ``setup``: re-run after the rewrite.
_COPYING_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging")


def _is_copying_callback(callback: object) -> bool:
    return any(cls.__name__ in _COPYING_CALLBACKS for cls in type(callback).__mro__)


def _holds_module_copy(callback: object, model: nn.Module) -> bool:
    """Whether a callback keeps its own nn.Module (a copy of the model made before AutoNorm)."""
    return any(
        isinstance(value, nn.Module) and value is not model for value in vars(callback).values()
    )


def _check_mode(mode: str | None, trial: Any, config: Any) -> str:
    """The mode, inferred from ``trial``/``config`` when None and checked against them."""
    inferred = "search" if trial is not None else "fixed" if config is not None else "learn"
    if mode is None:
        mode = inferred
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if trial is not None and config is not None:
        raise ValueError("give either `trial` (search mode) or `config` (fixed mode), not both")
    if mode != inferred:
        need = {"search": "`trial`", "fixed": "`config`", "learn": "neither `trial` nor `config`"}
        raise ValueError(
            f"mode={mode!r} needs {need[mode]}; got mode={mode!r} with {inferred} inputs"
        )
    return mode


def _check_learn_options(
    mode: str,
    mixing: str,
    mixing_lr_scale: float | None,
    mixing_weight_decay: float | None,
    finalize: bool,
    finalize_batches: int,
) -> None:
    if mixing not in SWITCHABLE_MIXINGS:
        raise ValueError(f"`mixing` must be one of {SWITCHABLE_MIXINGS}, got {mixing!r}")
    if mixing_lr_scale is not None and not (mixing_lr_scale > 0 and math.isfinite(mixing_lr_scale)):
        raise ValueError(f"`mixing_lr_scale` must be a positive number, got {mixing_lr_scale!r}")
    if mixing_weight_decay is not None and mixing_weight_decay < 0:
        raise ValueError(f"`mixing_weight_decay` must be >= 0, got {mixing_weight_decay!r}")
    if finalize_batches < 0:
        raise ValueError(f"`finalize_batches` must be >= 0, got {finalize_batches}")
    if mode != "learn" and (finalize or mixing_lr_scale is not None or mixing != "softmax"):
        raise ValueError("`finalize`, `mixing` and `mixing_lr_scale` apply to mode='learn' only")


def _check_budget(budget: Any, record_metrics: bool) -> Budget | None:
    budget = as_budget(budget)
    if budget is not None and budget.max_memory is not None and not record_metrics:
        raise ValueError("`budget.max_memory` needs record_metrics=True (memory is measured)")
    return budget


def _as_config(config: NormConfig | str | os.PathLike[str] | None) -> NormConfig | None:
    loaded = NormConfig.load(config) if isinstance(config, (str, os.PathLike)) else config
    if loaded is not None and not isinstance(loaded, NormConfig):
        raise ValueError(f"`config` must be a NormConfig or a path, got {type(config).__name__}")
    return loaded


def current_structure(
    model: nn.Module, feeders: Mapping[str, str | None] | None = None
) -> NormConfig:
    """The choice that rebuilds each slot's layer as it is now (what a checkpoint needs).

    Args:
        model: the model.
        feeders: ``{slot name: feeder name or None}`` as a probe found them: a rewrite of the
            norm layers leaves them as they are, so the model is not probed again. Without
            them the model is probed.
    """
    slots = find_slots(model, probe=feeders is None, feeders=feeders)
    config = NormConfig({s.name: s.keep_choice() for s in slots}, metadata={"source": "structure"})
    return config.with_probe(slots)


class _AutoNormLogic(_CallbackType):
    """Namespace-independent body of :class:`AutoNorm` (mixed into each Lightning's Callback)."""

    def __init__(
        self,
        mode: str | None = None,
        *,
        config: NormConfig | str | os.PathLike[str] | None = None,
        trial: Any = None,
        space: Any = "auto",
        monitor: str = "val_loss",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        candidates: Sequence[str] | dict[str, Sequence[str]] | None = None,
        mixing: str = "softmax",
        mixing_lr_scale: float | None = None,
        mixing_weight_decay: float | None = None,
        finalize: bool = False,
        finalize_batches: int = 20,
        calibration_forward: Callable[[nn.Module, Any], Any] | None = None,
        config_path: str | os.PathLike[str] | None = None,
        example_input: Any = None,
        log_mixing_weights: bool = True,
        record_metrics: bool = True,
        budget: Budget | Mapping[str, Any] | None = None,
        check_model: bool = True,
        init: str = "uniform",
    ) -> None:
        self.mode = _check_mode(mode, trial, config)
        _check_learn_options(
            self.mode, mixing, mixing_lr_scale, mixing_weight_decay, finalize, finalize_batches
        )
        if init not in SWITCHABLE_INITS or (init != "uniform" and self.mode != "learn"):
            raise ValueError(
                f"`init` must be one of {SWITCHABLE_INITS} in learn mode, got {init!r}"
            )
        self.init = init
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a metric name, got {monitor!r}")
        resolved_space = resolve_space(space)
        self.trial = trial
        self.monitor = monitor
        self.include = include
        self.exclude = exclude
        self.candidates = candidates
        self.mixing = mixing
        self.mixing_lr_scale = mixing_lr_scale
        self.mixing_weight_decay = mixing_weight_decay
        self.finalize = finalize
        self.finalize_batches = finalize_batches
        self.calibration_forward = calibration_forward or default_calibration_forward
        self.config_path = Path(config_path) if config_path is not None else None
        self.example_input = example_input
        self.log_mixing_weights = log_mixing_weights
        self.budget = _check_budget(budget, record_metrics)
        # syncbatchnorm only where the budget has several devices
        self.space: SearchSpace = resolved_space.for_budget(self.budget)
        self.config = _as_config(config)
        self.check_model = check_model
        self.slots: list[Slot] = []
        self.structure: NormConfig | None = None
        self.mixing_history: list[dict[str, Any]] = []
        self.recorder = TrainingStepRecorder() if record_metrics else None
        self._applied = False
        self._feeders: dict[str, str | None] | None = None  # the slots' feeders, from the probe
        self._original_configure_optimizers: Any = None
        self._radius_schedule: RadiusSchedule | None = None

    # -- setup: the rewrite --------------------------------------------------------------------

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._applied:
            return  # validate/test after fit: the model is already rewritten
        preceding = self._preceding_copies(trainer, pl_module)
        example = self.example_input
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        found = find_slots(pl_module, example)  # every slot, probed once
        self.slots = select_slots(found, self.include, self.exclude)
        if not self.slots:
            raise AutoNormError(self._no_slot_message(pl_module))
        self._rewrite(trainer, pl_module, found, example)
        self._applied = True
        self._feeders = {s.name: s.feeder for s in found}
        self.structure = current_structure(pl_module, self._feeders)
        if self.mode == "learn" and (
            self.mixing_lr_scale is not None or self.mixing_weight_decay is not None
        ):
            self._original_configure_optimizers = wrap_configure_optimizers(
                pl_module, lr_scale=self.mixing_lr_scale, weight_decay=self.mixing_weight_decay
            )
        for callback in preceding:
            callback.setup(trainer, pl_module, stage)  # let it copy the rewritten model
        self._check_params(trainer, pl_module)
        log.info(
            "AutoNorm (%s): rewrote %d slots of %s",
            self.mode,
            len(self.slots),
            type(pl_module).__name__,
        )

    def _no_slot_message(self, pl_module: nn.Module) -> str:
        selection = (
            f" matching include={self.include!r} exclude={self.exclude!r}"
            if self.include or self.exclude
            else ""
        )
        return (
            f"{type(pl_module).__name__} has no normalization slot{selection}: AutoNorm needs at "
            "least one BatchNorm/GroupNorm/InstanceNorm/LayerNorm/RMSNorm layer (or a class "
            "registered with autonorm.register_slot_type)"
        )

    def _rewrite(self, trainer: Any, pl_module: nn.Module, found: list[Slot], example: Any) -> None:
        """Rewrite the model: the structure of the checkpoint a fit resumes from, else by mode.

        ``found`` holds every slot (the selected ones are :attr:`slots`): a config may name
        slots outside the selection, and slots sharing a feeder must agree on its weight.
        """
        partial = self.include is not None or self.exclude is not None
        resumed = structure_from_checkpoint(getattr(trainer, "ckpt_path", None))
        if resumed is not None:
            structure, config = resumed
            if config is not None:
                self.config = config
            apply_config(pl_module, structure, partial=True, example_input=example, slots=found)
            return
        if self.mode == "learn":
            # softmax SN is built as before (no `mixing` in its choices)
            extra: dict[str, Any] = {"mixing": self.mixing} if self.mixing != "softmax" else {}
            to_switchable(
                pl_module,
                slots=self.slots,
                candidates=self.candidates,
                example_input=example,
                init=self.init,
                **extra,
            )
            return
        if self.mode == "search":
            self.config = trial_glue.suggest_config(self.trial, self.space, self.slots, trainer)
        assert self.config is not None
        apply_config(
            pl_module,
            self.config,
            partial=partial,
            example_input=example,
            slots=found,
            check_model=self.check_model,
        )

    def _preceding_copies(self, trainer: Any, pl_module: nn.Module) -> list[Any]:
        """Callbacks listed before this one that may already hold a copy of the old model."""
        preceding = []
        for callback in getattr(trainer, "callbacks", []):
            if callback is self:
                break
            if _is_copying_callback(callback):
                preceding.append(callback)
            elif _holds_module_copy(callback, pl_module):
                raise AutoNormError(
                    f"{type(callback).__name__} is listed before AutoNorm and already holds a copy "
                    "of the model made before AutoNorm rewrote it; put AutoNorm first in "
                    "Trainer(callbacks=[AutoNorm(...), ...])"
                )
        return preceding

    def _check_params(self, trainer: Any, pl_module: nn.Module) -> None:
        """Record the rewritten model's parameter count; over ``budget.max_params``: stop."""
        n_params = sum(p.numel() for p in pl_module.parameters())
        if self.trial is not None and trial_glue.is_global_zero(trainer):
            self.trial.set_user_attr(keys.N_PARAMS, n_params)
        limit = self.budget.max_params if self.budget is not None else None
        if limit is not None and n_params > limit:
            trial_glue.stop_infeasible(
                self.trial,
                f"{n_params} parameters > budget max_params={limit}",
                self.measurements(),
            )

    # -- search mode: measure, report, prune ---------------------------------------------------

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        layers = sparse_layers(pl_module) if self.mode == "learn" else []
        if not layers:
            return
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise AutoNormError(
                "mixing='sparsestmax' grows the radius over a known training length: give the "
                f"Trainer max_epochs or max_steps (estimated stepping batches: {total})"
            )
        self._radius_schedule = RadiusSchedule(layers, int(total))

    @override
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:  # the size it really trains at
            expected = self.budget.batch_size if self.budget is not None else None
            trial_glue.observe_batch_size(self.trial, trainer, batch, expected)
        if self._radius_schedule is not None:
            self._radius_schedule.update(trainer.global_step)
        if self.recorder is not None:
            self.recorder.batch_start(pl_module)

    @override
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.forward_done()

    @override
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is None:
            return
        self.recorder.batch_end(pl_module, trainer.optimizers)
        limit = self.budget.max_memory if self.budget is not None else None
        if limit is not None and self.recorder.peak_memory > limit:
            trial_glue.stop_infeasible(
                self.trial,
                f"peak memory {format_bytes(self.recorder.peak_memory)} ({self.recorder.method}) > "
                f"budget max_memory={format_bytes(limit)}",
                self.measurements(),
            )

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.trial is None or trainer.sanity_checking:
            return
        if trial_glue.is_global_zero(trainer):
            # free per-slot evidence for the staged plan's refinement: what the trial's
            # SwitchableNorm layers weigh highest so far (a screened trial stops at its rung)
            mixed = switchable_choices(pl_module, self.slots)
            if mixed:
                trial_glue.record_switchable_choices(self.trial, mixed)
        trial_glue.report_epoch(self.trial, trainer, self.monitor, self.measurements())

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.recorder is not None:  # a step that died mid-forward must not leave its hooks
            self.recorder.forward_done()
        if self.trial is not None and is_oom_error(exception):
            self.mark_infeasible(trial_glue.OOM_REASON)

    def measurements(self) -> dict[str, Any]:
        """The step recorder's summary so far (empty without ``record_metrics``)."""
        return self.recorder.summary() if self.recorder is not None else {}

    def mark_infeasible(self, reason: str) -> None:
        """Record on the trial that it broke the budget (a constraint Optuna's samplers read)."""
        if self.trial is not None:
            trial_glue.mark_infeasible(self.trial, reason, self.measurements())

    def monitored_value(self, trainer: Any) -> float:
        """The monitored metric's last value.

        Raises:
            AutoNormError: the metric was never logged (names the metrics that were).
        """
        return trial_glue.monitored_value(trainer, self.monitor)

    def outcome(self, trainer: Any) -> TrialOutcome:
        """The finished run for the trial runner: the monitored metric and the measurements.

        Raises:
            optuna.TrialPruned: the metric's last value is not finite (the reason is recorded
                on the trial).
            AutoNormError: the metric was never logged.
        """
        return trial_glue.trial_outcome(self.trial, trainer, self.monitor, self.measurements())

    # -- learn mode: log weights, derive, finalize ---------------------------------------------

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.mode != "learn" or not self.log_mixing_weights:
            return
        layers = switchable_layers(pl_module)
        if not layers:
            return
        snapshot = {name: sn.mixing_weights() for name, sn in layers.items()}
        self.mixing_history.append({"epoch": trainer.current_epoch, "weights": snapshot})
        metrics = {
            f"autonorm/{name}/{kind}_{cand}": weight
            for name, weights in snapshot.items()
            for kind, per_cand in weights.items()
            for cand, weight in per_cand.items()
        }
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.mode == "learn":
            if not switchable_layers(pl_module):
                return  # already finalized (a second fit)
            self.config = derive_config(pl_module)
            self.config.metadata["mixing"] = self.mixing
            if self.finalize:
                self._finalize(trainer, pl_module)
        if self.trial is not None and trial_glue.is_global_zero(trainer):
            trial_glue.record_measurements(self.trial, self.measurements())
        if self.config is not None:
            path = self.resolved_config_path(trainer)  # every rank: trainer.log_dir is a collective
            if trial_glue.is_global_zero(trainer):
                self.config.save(path)
                log.info("AutoNorm: wrote %s", path)
        if getattr(trainer, "world_size", 1) > 1:
            # ranks leave together: rank 0 hosts the process group's store, and a rank still
            # deriving its config when rank 0 exits aborts in gloo's teardown
            trainer.strategy.barrier("autonorm_fit_end")

    def _finalize(self, trainer: Any, pl_module: Any) -> None:
        """Swap the SwitchableNorms for the derived native layers; recalibrate new BatchNorms."""
        assert self.config is not None
        apply_config(
            pl_module,
            self.config,
            partial=True,
            example_input=getattr(pl_module, "example_input_array", None),
        )
        new_bns = slot_batchnorms(  # fused norm+activation slots included
            pl_module, [n for n, c in self.config.choices.items() if c.name == "batchnorm"]
        )
        if new_bns and self.finalize_batches:
            loader = trainer.train_dataloader
            if loader is None:
                raise AutoNormError(
                    "finalize=True needs the training dataloader to recalibrate BatchNorm"
                )
            batches = (trainer.strategy.batch_to_device(b) for b in loader)
            used = recalibrate_batchnorm(
                pl_module,
                batches,
                num_batches=self.finalize_batches,
                forward=self.calibration_forward,
                modules=new_bns,
            )
            log.info("AutoNorm: recalibrated %d BatchNorm layers on %d batches", len(new_bns), used)
        self.structure = current_structure(pl_module, self._feeders)

    def resolved_config_path(self, trainer: Any) -> Path:
        """Where the derived/applied config is written."""
        if self.config_path is not None:
            return self.config_path
        folder = getattr(trainer, "log_dir", None) or trainer.default_root_dir
        return Path(folder) / "autonorm_config.yaml"

    # -- checkpoints ---------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # the structure recorded after the rewrite (and after finalize): no probe per checkpoint
        structure = self.structure
        if structure is None:
            structure = current_structure(pl_module, self._feeders)
        checkpoint[CHECKPOINT_KEY] = checkpoint_entry(
            structure, self.config, self.mode, self._feeders
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "config": None if self.config is None else self.config.to_dict(),
            "structure": None if self.structure is None else self.structure.to_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        config = state_dict.get("config")
        if config is not None and self.config is None:
            self.config = NormConfig.from_dict(config)
        structure = state_dict.get("structure")
        if structure is not None:
            self.structure = NormConfig.from_dict(structure)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._original_configure_optimizers is not None and stage == "fit":
            pl_module.configure_optimizers = self._original_configure_optimizers
            self._original_configure_optimizers = None


class AutoNorm(_AutoNormLogic, *callback_bases()):  # type: ignore[misc]
    """Rewrite a LightningModule's norm slots: learned, searched, or from a saved config.

    Args:
        mode: ``"learn"`` (every slot becomes a :class:`~autonorm.norms.SwitchableNorm`; the
            derived discrete config is written at the end of fit), ``"search"`` (choices from an
            Optuna ``trial``; the monitored metric is reported and the trial pruned) or
            ``"fixed"`` (a given ``config``). Inferred from ``trial``/``config`` when omitted.
        config: a :class:`~autonorm.NormConfig` or a path to one (fixed mode).
        trial: an ``optuna.Trial`` (search mode). One parameter per slot, named by the slot.
        space: search space for search mode: a preset name, a YAML path, a dict or a
            :class:`~autonorm.search_spaces.SearchSpace`.
        monitor: metric reported to the trial after every validation (search mode).
        include, exclude: glob patterns on slot names selecting the slots to rewrite.
        candidates: SwitchableNorm candidates (learn mode), a tuple or ``{layout: tuple}``.
        mixing: learn mode: ``"softmax"`` (SN) or ``"sparsestmax"`` (Sparse SN: the radius grows
            in steps from sparsemax at the start to one normalizer per layer at 80% of
            ``trainer.estimated_stepping_batches``, so the derived config is what the model
            trained with).
        mixing_lr_scale: learn mode: train the mixing logits at ``lr * mixing_lr_scale`` in a
            param group of their own (Sparse SN uses 0.1).
        mixing_weight_decay: learn mode: weight decay of the mixing logits (e.g. 0.0).
        finalize: learn mode: at the end of fit swap the SwitchableNorms for the chosen native
            layers and recompute BatchNorm statistics on ``finalize_batches`` training batches.
        calibration_forward: ``f(module, batch)`` used for that recalibration.
        config_path: where to write the config (default: the trainer's log dir).
        example_input: input for the probe that records each slot's input shape (default: the
            module's ``example_input_array``).
        log_mixing_weights: log the per-slot mixing weights to the trainer's loggers each epoch.
        record_metrics: record step time and peak memory (and report them to the trial).
        budget: an :class:`~autonorm.Budget` or its dict: a trial over it is pruned as
            infeasible (an error without a trial).
        check_model: fixed mode: refuse a config recorded for another model class (its
            metadata ``model_class``); False applies it anyway.
        init: learn mode: ``"uniform"`` mixing weights, or ``"original"`` for a pretrained
            model: each layer starts on the statistic of the normalizer it replaces
            (:func:`~autonorm.to_switchable`).

    Raises:
        ValueError: invalid arguments (unknown mode, trial and config together, ...).

    Example::

        trainer = Trainer(callbacks=[AutoNorm(mode="learn", finalize=True)])
        trainer.fit(model, datamodule)
    """


__all__ = ["MODES", "AutoNorm"]
