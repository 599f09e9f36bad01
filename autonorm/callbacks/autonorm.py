"""The AutoNorm Lightning callback: learned Switchable Norm, trial-driven search, fixed configs.

The callback is thin: it validates in ``__init__``, rewrites the model in ``setup`` (the last hook
before ``configure_optimizers``, the move to the device and the DDP wrap) and delegates to
:mod:`autonorm.surgery`, which works without Lightning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autonorm._errors import AutoNormError
from autonorm.budget import Budget, format_bytes
from autonorm.callbacks._lightning import CALLBACK_BASES
from autonorm.config import NormChoice, NormConfig
from autonorm.measure import TrainingStepRecorder
from autonorm.search_spaces import SearchSpace, resolve_space
from autonorm.slots import Slot, find_slots
from autonorm.surgery import apply_config, derive_config, switchable_layers, to_switchable

log = logging.getLogger(__name__)

MODES = ("learn", "search", "fixed")
CHECKPOINT_KEY = "autonorm"
#: Callbacks known to copy the model in their own ``setup``: re-run after the rewrite.
_COPYING_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging")


def _is_copying_callback(callback: object) -> bool:
    return any(cls.__name__ in _COPYING_CALLBACKS for cls in type(callback).__mro__)


def _holds_module_copy(callback: object, model: nn.Module) -> bool:
    """Whether a callback keeps its own nn.Module (a copy of the model made before AutoNorm)."""
    return any(
        isinstance(value, nn.Module) and value is not model for value in vars(callback).values()
    )


def default_calibration_forward(module: nn.Module, batch: Any) -> Any:
    """Feed a training batch to a module: the first element of a tuple/list batch, a dict's
    ``"x"``/``"input"``/``"inputs"`` entry, else the batch itself."""
    if isinstance(batch, (list, tuple)):
        return module(batch[0])
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs"):
            if key in batch:
                return module(batch[key])
    return module(batch)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int = 20,
    forward: Callable[[nn.Module, Any], Any] = default_calibration_forward,
    modules: Sequence[nn.modules.batchnorm._BatchNorm] | None = None,
) -> int:
    """Recompute BatchNorm running statistics with forward passes (cumulative averages).

    Only the BatchNorm layers are in training mode meanwhile: dropout and the rest stay in
    eval mode; every module's train/eval flag is restored afterwards.

    Returns:
        The number of batches used.
    """
    bns = (
        list(modules)
        if modules is not None
        else [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    )
    if not bns or num_batches <= 0:
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
            bn.train()
        used = 0
        for batch in batches:
            if used >= num_batches:
                break
            forward(model, batch)
            used += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, flag in flags.items():
            m.training = flag
    return used


class _AutoNormLogic:
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
        mixing_lr_scale: float | None = None,
        mixing_weight_decay: float | None = None,
        finalize: bool = False,
        finalize_batches: int = 20,
        calibration_forward: Callable[[nn.Module, Any], Any] | None = None,
        config_path: str | os.PathLike[str] | None = None,
        example_input: Any = None,
        log_mixing_weights: bool = True,
        record_metrics: bool = True,
        budget: Budget | None = None,
    ) -> None:
        inferred = "search" if trial is not None else "fixed" if config is not None else "learn"
        if mode is None:
            mode = inferred
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        if trial is not None and config is not None:
            raise ValueError("give either `trial` (search mode) or `config` (fixed mode), not both")
        if mode != inferred:
            need = {
                "search": "`trial`",
                "fixed": "`config`",
                "learn": "neither `trial` nor `config`",
            }
            raise ValueError(
                f"mode={mode!r} needs {need[mode]}; got mode={mode!r} with {inferred} inputs"
            )
        if mixing_lr_scale is not None and not (
            mixing_lr_scale > 0 and math.isfinite(mixing_lr_scale)
        ):
            raise ValueError(
                f"`mixing_lr_scale` must be a positive number, got {mixing_lr_scale!r}"
            )
        if mixing_weight_decay is not None and mixing_weight_decay < 0:
            raise ValueError(f"`mixing_weight_decay` must be >= 0, got {mixing_weight_decay!r}")
        if finalize_batches < 0:
            raise ValueError(f"`finalize_batches` must be >= 0, got {finalize_batches}")
        if mode != "learn" and (finalize or mixing_lr_scale is not None):
            raise ValueError("`finalize` and `mixing_lr_scale` apply to mode='learn' only")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a metric name, got {monitor!r}")
        self.mode = mode
        self.trial = trial
        self.space: SearchSpace = resolve_space(space)
        self.monitor = monitor
        self.include = include
        self.exclude = exclude
        self.candidates = candidates
        self.mixing_lr_scale = mixing_lr_scale
        self.mixing_weight_decay = mixing_weight_decay
        self.finalize = finalize
        self.finalize_batches = finalize_batches
        self.calibration_forward = calibration_forward or default_calibration_forward
        self.config_path = Path(config_path) if config_path is not None else None
        self.example_input = example_input
        self.log_mixing_weights = log_mixing_weights
        if budget is not None and not isinstance(budget, Budget):
            raise ValueError(f"`budget` must be an autonorm.Budget, got {type(budget).__name__}")
        if budget is not None and budget.max_memory is not None and not record_metrics:
            raise ValueError("`budget.max_memory` needs record_metrics=True (memory is measured)")
        self.budget = budget
        self.space = self.space.for_budget(budget)  # syncbatchnorm only on several devices
        self.config: NormConfig | None = (
            NormConfig.load(config) if isinstance(config, (str, os.PathLike)) else config
        )
        if self.config is not None and not isinstance(self.config, NormConfig):
            raise ValueError(
                f"`config` must be a NormConfig or a path, got {type(config).__name__}"
            )
        self.slots: list[Slot] = []
        self.structure: NormConfig | None = None
        self.mixing_history: list[dict[str, Any]] = []
        self.recorder = TrainingStepRecorder() if record_metrics else None
        self._applied = False
        self._original_configure_optimizers: Any = None

    # -- setup: the rewrite --------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._applied:
            return  # validate/test after fit: the model is already rewritten
        preceding = self._preceding_copies(trainer, pl_module)
        example = self.example_input
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        slots = find_slots(pl_module, example, include=self.include, exclude=self.exclude)
        if not slots:
            raise AutoNormError(
                f"{type(pl_module).__name__} has no normalization slot"
                + (
                    f" matching include={self.include!r} exclude={self.exclude!r}"
                    if self.include or self.exclude
                    else ""
                )
                + ": AutoNorm needs at least one BatchNorm/GroupNorm/InstanceNorm/LayerNorm/RMSNorm "
                "layer (or a class registered with autonorm.register_slot_type)"
            )
        self.slots = slots
        partial = self.include is not None or self.exclude is not None
        resumed = self._structure_from_checkpoint(getattr(trainer, "ckpt_path", None))
        if resumed is not None:
            apply_config(pl_module, resumed, partial=True, example_input=example)
        elif self.mode == "learn":
            to_switchable(
                pl_module,
                [s.name for s in slots],
                candidates=self.candidates,
                example_input=example,
            )
        elif self.mode == "fixed":
            assert self.config is not None
            apply_config(pl_module, self.config, partial=partial, example_input=example)
        else:
            self.config = self._suggest(trainer, slots)
            apply_config(pl_module, self.config, partial=partial, example_input=example)
        self._applied = True
        self.structure = self._current_structure(pl_module)
        if self.mode == "learn" and (
            self.mixing_lr_scale is not None or self.mixing_weight_decay is not None
        ):
            self._wrap_configure_optimizers(pl_module)
        for callback in preceding:
            callback.setup(trainer, pl_module, stage)  # let it copy the rewritten model
        n_params = sum(p.numel() for p in pl_module.parameters())
        if self.trial is not None and self._is_global_zero(trainer):
            self.trial.set_user_attr("n_params", n_params)
        if (
            self.budget is not None
            and self.budget.max_params is not None
            and n_params > self.budget.max_params
        ):
            self._over_budget(f"{n_params} parameters > budget max_params={self.budget.max_params}")
        log.info(
            "AutoNorm (%s): rewrote %d slots of %s", self.mode, len(slots), type(pl_module).__name__
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

    def _current_structure(self, pl_module: nn.Module) -> NormConfig:
        slots = find_slots(pl_module)
        return NormConfig(
            {s.name: s.keep_choice() for s in slots}, metadata={"source": "structure"}
        )

    def _structure_from_checkpoint(self, ckpt_path: Any) -> NormConfig | None:
        if not ckpt_path or not Path(str(ckpt_path)).is_file():
            return None
        checkpoint = _load_checkpoint(ckpt_path)
        info = checkpoint.get(CHECKPOINT_KEY)
        if not info or not info.get("structure"):
            return None
        if info.get("config"):
            self.config = NormConfig.from_dict(info["config"])
        return NormConfig.from_dict(info["structure"])

    def _suggest(self, trainer: Any, slots: list[Slot]) -> NormConfig:
        """One parameter per slot (or tied group), named by the slot, sampled on rank 0."""
        params = self.space.parameters(slots)
        chosen: dict[str, str] | None = None
        if self._is_global_zero(trainer):
            chosen = {
                name: self.trial.suggest_categorical(name, labels)
                for name, (labels, _) in params.items()
            }
        strategy = getattr(trainer, "strategy", None)
        if getattr(trainer, "world_size", 1) > 1 and strategy is not None:
            chosen = strategy.broadcast(chosen, src=0)
        assert chosen is not None
        choices = {
            slot: NormChoice.parse(chosen[name])
            for name, (_, names) in params.items()
            for slot in names
        }
        metadata: dict[str, Any] = {"source": "trial", "space": self.space.to_dict()}
        if self.trial is not None:
            metadata["trial"] = self.trial.number
        config = NormConfig(choices, metadata=metadata)
        if self.trial is not None and self._is_global_zero(trainer):
            self.trial.set_user_attr("config", {k: v.to_value() for k, v in config.choices.items()})
        return config

    def _wrap_configure_optimizers(self, pl_module: Any) -> None:
        """Move the SN mixing logits into their own param group (scaled lr, own weight decay),
        before Lightning restores optimizer state, so that checkpoints resume."""
        original = pl_module.configure_optimizers
        self._original_configure_optimizers = original
        mixing = {
            id(p)
            for sn in switchable_layers(pl_module).values()
            for p in (sn.mean_weight, sn.var_weight)
        }
        scale, decay = self.mixing_lr_scale or 1.0, self.mixing_weight_decay

        def configure_optimizers() -> Any:
            result = original()
            for optimizer, schedulers in _optimizers_and_schedulers(result):
                split_mixing_group(
                    optimizer, mixing, lr_scale=scale, weight_decay=decay, schedulers=schedulers
                )
            return result

        pl_module.configure_optimizers = configure_optimizers

    # -- search mode: report, prune, record ----------------------------------------------------

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is not None:
            self.recorder.batch_start(pl_module)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.forward_done()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is None:
            return
        self.recorder.batch_end(pl_module, trainer.optimizers)
        limit = self.budget.max_memory if self.budget is not None else None
        if limit is not None and self.recorder.peak_memory > limit:
            self._over_budget(
                f"peak memory {format_bytes(self.recorder.peak_memory)} ({self.recorder.method}) > "
                f"budget max_memory={format_bytes(limit)}"
            )

    def mark_infeasible(self, reason: str) -> None:
        """Record on the trial that it broke the budget (a constraint Optuna's samplers read)."""
        if self.trial is None:
            return
        self._record_metrics()
        self.trial.set_user_attr("feasible", False)
        self.trial.set_user_attr("infeasible_reason", reason)
        self.trial.set_user_attr("prune_reason", f"infeasible: {reason}")
        self.trial.set_constraint("budget", 1.0)

    def _over_budget(self, reason: str) -> None:
        if self.trial is None:
            raise AutoNormError(f"over budget: {reason}")
        import optuna

        self.mark_infeasible(reason)
        raise optuna.TrialPruned(f"Trial is infeasible: {reason}.")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.trial is None or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        reason = None
        if self._is_global_zero(trainer):
            value = self.monitored_value(trainer)
            if not math.isfinite(value):
                reason = f"{self.monitor} is {value} at epoch {epoch}"
            elif len(self.trial.study.directions) == 1:  # Optuna cannot prune multi-objective
                self.trial.report(value, step=epoch)
                if self.trial.should_prune():
                    reason = f"pruned by {type(getattr(self.trial.study, 'pruner', None)).__name__} at epoch {epoch}"
            self.trial.set_user_attr("epochs", epoch + 1)
            self._record_metrics()
        if getattr(trainer, "world_size", 1) > 1:
            reason = trainer.strategy.broadcast(reason, src=0)
        if reason is not None:
            import optuna

            if self._is_global_zero(trainer):
                self.trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(f"Trial was pruned: {reason}.")

    def monitored_value(self, trainer: Any) -> float:
        """The monitored metric's last value.

        Raises:
            AutoNormError: the metric was never logged (names the metrics that were).
        """
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise AutoNormError(
                f"monitor {self.monitor!r} was never logged; logged metrics: "
                f"{sorted(metrics) or 'none'} (log it with self.log({self.monitor!r}, ...) in "
                "validation_step)"
            )
        return float(metrics[self.monitor])

    def _record_metrics(self) -> None:
        if self.trial is None or self.recorder is None:
            return
        for key, value in self.recorder.summary().items():
            self.trial.set_user_attr(key, value)

    # -- learn mode: log weights, derive, finalize ---------------------------------------------

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

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.mode == "learn":
            if not switchable_layers(pl_module):
                return  # already finalized (a second fit)
            self.config = derive_config(pl_module)
            if self.finalize:
                self._finalize(trainer, pl_module)
        if self.trial is not None and self._is_global_zero(trainer):
            self._record_metrics()
        if self.config is not None:
            path = self.resolved_config_path(trainer)  # every rank: trainer.log_dir is a collective
            if self._is_global_zero(trainer):
                self.config.save(path)
                log.info("AutoNorm: wrote %s", path)
        if getattr(trainer, "world_size", 1) > 1:
            # ranks leave together: rank 0 hosts the process group's store, and a rank still
            # deriving its config when rank 0 exits aborts in gloo's teardown
            trainer.strategy.barrier("autonorm_fit_end")

    def _finalize(self, trainer: Any, pl_module: Any) -> None:
        assert self.config is not None
        apply_config(
            pl_module,
            self.config,
            partial=True,
            example_input=getattr(pl_module, "example_input_array", None),
        )
        new_bns = [
            module
            for name, module in pl_module.named_modules()
            if name in self.config.choices
            and self.config.choices[name].name == "batchnorm"
            and isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
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
        self.structure = self._current_structure(pl_module)

    def resolved_config_path(self, trainer: Any) -> Path:
        """Where the derived/applied config is written."""
        if self.config_path is not None:
            return self.config_path
        folder = getattr(trainer, "log_dir", None) or trainer.default_root_dir
        return Path(folder) / "autonorm_config.yaml"

    # -- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "structure": self._current_structure(pl_module).to_dict(),
            "config": None if self.config is None else self.config.to_dict(),
            "mode": self.mode,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "config": None if self.config is None else self.config.to_dict(),
            "structure": None if self.structure is None else self.structure.to_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        config = state_dict.get("config")
        if config is not None and self.config is None:
            self.config = NormConfig.from_dict(config)
        structure = state_dict.get("structure")
        if structure is not None:
            self.structure = NormConfig.from_dict(structure)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._original_configure_optimizers is not None and stage == "fit":
            pl_module.configure_optimizers = self._original_configure_optimizers
            self._original_configure_optimizers = None

    @staticmethod
    def _is_global_zero(trainer: Any) -> bool:
        return bool(getattr(trainer, "is_global_zero", True))


class AutoNorm(_AutoNormLogic, *CALLBACK_BASES):  # type: ignore[misc]
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

    Raises:
        ValueError: invalid arguments (unknown mode, trial and config together, ...).

    Example::

        trainer = Trainer(callbacks=[AutoNorm(mode="learn", finalize=True)])
        trainer.fit(model, datamodule)
    """


def _load_checkpoint(path: Any) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` (no arbitrary unpickling)."""
    from autonorm.callbacks._lightning import checkpoint_safe_globals

    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def load_from_checkpoint(
    model_class: type[nn.Module],
    checkpoint_path: str | os.PathLike[str],
    *,
    strict: bool = True,
    map_location: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Rebuild a model trained with :class:`AutoNorm` from its checkpoint.

    ``ModelClass.load_from_checkpoint`` builds the original architecture, so it fails on the
    rewritten layers' weights; this function builds the model, applies the checkpoint's layer
    structure and loads the weights strictly.

    Args:
        model_class: the LightningModule (or nn.Module) class.
        checkpoint_path: the ``.ckpt`` file.
        strict: strict ``load_state_dict`` (default).
        map_location: device for the weights (default CPU).
        **kwargs: init arguments overriding the checkpoint's saved hyperparameters.

    Raises:
        AutoNormError: the checkpoint was not written with the AutoNorm callback.
    """
    checkpoint = _load_checkpoint(checkpoint_path)
    info = checkpoint.get(CHECKPOINT_KEY)
    if not info or not info.get("structure"):
        raise AutoNormError(
            f"{os.fspath(checkpoint_path)!r} holds no AutoNorm structure: it was not saved by a "
            f"Trainer with the AutoNorm callback; use {model_class.__name__}.load_from_checkpoint"
        )
    hparams = {
        k: v
        for k, v in dict(checkpoint.get("hyper_parameters") or {}).items()
        if not k.startswith("_")
    }
    model = model_class(**{**hparams, **kwargs})
    apply_config(model, NormConfig.from_dict(info["structure"]), partial=True)
    state = checkpoint["state_dict"]
    if map_location is not None:
        state = {k: v.to(map_location) for k, v in state.items()}
    model.load_state_dict(state, strict=strict)
    if info.get("config"):
        model.autonorm_config = NormConfig.from_dict(info["config"])  # type: ignore[assignment]
    return model


def _optimizers_and_schedulers(result: Any) -> list[tuple[torch.optim.Optimizer, list[Any]]]:
    """Optimizers in a ``configure_optimizers`` result, each with its schedulers."""
    if isinstance(result, torch.optim.Optimizer):
        return [(result, [])]
    if isinstance(result, dict):
        scheduler = result.get("lr_scheduler")
        scheduler = scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
        return [(result["optimizer"], [scheduler] if scheduler is not None else [])]
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], (list, tuple)):
        optimizers, schedulers = result
        flat = [s.get("scheduler") if isinstance(s, dict) else s for s in schedulers]
        return [
            (opt, [s for s in flat if getattr(s, "optimizer", None) is opt]) for opt in optimizers
        ]
    if isinstance(result, (list, tuple)):
        out = []
        for item in result:
            out.extend(_optimizers_and_schedulers(item))
        return out
    return []


def split_mixing_group(
    optimizer: torch.optim.Optimizer,
    mixing_ids: set[int],
    *,
    lr_scale: float = 1.0,
    weight_decay: float | None = None,
    schedulers: Sequence[Any] = (),
) -> None:
    """Move the SwitchableNorm mixing logits out of their param groups into one of their own.

    The new group copies its source group's settings with ``lr * lr_scale`` and the given weight
    decay. Schedulers that keep per-group lists (``base_lrs``, ``lr_lambdas``, ``min_lrs``) get an
    entry for the new group; schedulers with per-group state autonorm cannot extend raise.
    """
    moved: list[nn.Parameter] = []
    source: dict[str, Any] | None = None
    for group in optimizer.param_groups:
        keep = [p for p in group["params"] if id(p) not in mixing_ids]
        if len(keep) != len(group["params"]):
            source = source or group
            moved.extend(p for p in group["params"] if id(p) in mixing_ids)
            group["params"] = keep
    if not moved or source is None:
        return
    new_group = {k: v for k, v in source.items() if k != "params"}
    new_group["lr"] = source["lr"] * lr_scale
    if "initial_lr" in source:
        new_group["initial_lr"] = source["initial_lr"] * lr_scale
    if weight_decay is not None:
        new_group["weight_decay"] = weight_decay
    for scheduler in schedulers:
        unsupported = [
            a for a in ("max_lrs", "base_momentums", "max_momentums") if hasattr(scheduler, a)
        ]
        if unsupported or type(scheduler).__name__ in ("OneCycleLR", "CyclicLR"):
            raise AutoNormError(
                f"mixing_lr_scale cannot extend {type(scheduler).__name__} with a new param group; "
                "leave mixing_lr_scale=None or build the param groups yourself with "
                "autonorm.callbacks.split_mixing_group in configure_optimizers"
            )
    optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
    optimizer.add_param_group({"params": moved, **new_group})
    for scheduler in schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs.append(new_group.get("initial_lr", new_group["lr"]))
        if hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        if hasattr(scheduler, "min_lrs"):
            scheduler.min_lrs.append(scheduler.min_lrs[0])
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(new_group["lr"])


__all__ = ["AutoNorm", "load_from_checkpoint", "recalibrate_batchnorm", "split_mixing_group"]
