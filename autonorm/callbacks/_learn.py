"""Learn the choice: every slot becomes a SwitchableNorm; the derived config at the end of fit."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn
from typing_extensions import Unpack, override

from autonorm._errors import AutoNormError
from autonorm.callbacks._optimizers import wrap_configure_optimizers
from autonorm.callbacks._perturbation import DERIVE_METHODS, finalize_checked, learned_config
from autonorm.callbacks._rewrite import AutoNorm, RewriteOptions, current_structure
from autonorm.callbacks._ssn import RadiusSchedule, sparse_layers
from autonorm.norms import SWITCHABLE_MIXINGS
from autonorm.surgery import (
    SWITCHABLE_INITS,
    Slot,
    apply_config,
    default_calibration_forward,
    recalibrate_batchnorm,
    slot_batchnorms,
    switchable_layers,
    to_switchable,
)

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule, Trainer


log = logging.getLogger(__name__)


def _check_learn_options(
    mixing: str,
    mixing_lr_scale: float | None,
    mixing_weight_decay: float | None,
    finalize_batches: int,
    init: str,
    derive: str,
    monitor: str | None,
    monitor_mode: str,
) -> None:
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"`monitor` must be a metric's name or None, got {monitor!r}")
    if derive not in DERIVE_METHODS:
        raise ValueError(f"`derive` must be one of {DERIVE_METHODS}, got {derive!r}")
    if monitor_mode not in ("min", "max"):
        raise ValueError(f"`monitor_mode` must be 'min' or 'max', got {monitor_mode!r}")
    if mixing not in SWITCHABLE_MIXINGS:
        raise ValueError(f"`mixing` must be one of {SWITCHABLE_MIXINGS}, got {mixing!r}")
    if mixing_lr_scale is not None and not (mixing_lr_scale > 0 and math.isfinite(mixing_lr_scale)):
        raise ValueError(f"`mixing_lr_scale` must be a positive number, got {mixing_lr_scale!r}")
    if mixing_weight_decay is not None and mixing_weight_decay < 0:
        raise ValueError(f"`mixing_weight_decay` must be >= 0, got {mixing_weight_decay!r}")
    if finalize_batches < 0:
        raise ValueError(f"`finalize_batches` must be >= 0, got {finalize_batches}")
    if init not in SWITCHABLE_INITS:
        raise ValueError(f"`init` must be one of {SWITCHABLE_INITS}, got {init!r}")


class LearnNorms(AutoNorm, mode="learn"):
    """Every slot becomes a learned :class:`~autonorm.norms.SwitchableNorm`; at the end of fit
    the discrete per-slot config is derived (:attr:`config`) and written: by perturbation where
    the fit has validation data (each slot's candidates forced one at a time, the monitored
    metric of a validation pass after each, :func:`~autonorm.surgery.perturb_slots`), else from
    the largest learned mixing weights (:func:`~autonorm.derive_config`).

    Args:
        candidates: SwitchableNorm candidates, a tuple or ``{layout: tuple}``.
        mixing: ``"softmax"`` (SN) or ``"sparsestmax"`` (Sparse SN: the radius grows in steps
            from sparsemax at the start to one normalizer per layer at 80% of
            ``trainer.estimated_stepping_batches``, so the derived config is what the model
            trained with).
        mixing_lr_scale: train the mixing logits at ``lr * mixing_lr_scale`` in a param group
            of their own (Sparse SN uses 0.1).
        mixing_weight_decay: weight decay of the mixing logits (e.g. 0.0).
        finalize: at the end of fit swap the SwitchableNorms for the chosen native layers and
            recompute BatchNorm statistics on ``finalize_batches`` training batches. Where the
            fit has validation data, the monitored metric is measured before and after: a
            model worse by more than 5% gets its SwitchableNorms back, with a warning naming
            both values (:attr:`finalized` says which was kept).
        calibration_forward: ``f(module, batch)`` used for that recalibration.
        log_mixing_weights: log the per-slot mixing weights to the trainer's loggers each epoch.
        init: ``"uniform"`` mixing weights, or ``"original"`` for a pretrained model: each
            layer starts on the statistic of the normalizer it replaces
            (:func:`~autonorm.to_switchable`).
        derive: ``"auto"`` (perturbation where the fit, in one process, has validation data and
            a known monitor, else the weights, saying why in the log; the weights for Sparse
            SN, whose layers end on the one normalizer they trained with), ``"perturbation"``
            (refused in one line where it cannot run) or ``"weights"``. Perturbation costs
            validation passes, about twice the slots times the candidates.
        monitor: the validation metric perturbation compares; by default the monitor of the
            Trainer's checkpoint or early-stopping callback, else ``val_loss`` where logged.
        monitor_mode: ``"min"`` or ``"max"``: the direction of ``monitor`` when given.
        **options: ``include``, ``exclude``, ``example_input``, ``config_path``,
            ``record_metrics``, ``budget``: as :class:`~autonorm.callbacks.AutoNorm`.

    Raises:
        ValueError: invalid arguments.
    """

    def __init__(
        self,
        *,
        candidates: Sequence[str] | dict[str, Sequence[str]] | None = None,
        mixing: str = "softmax",
        mixing_lr_scale: float | None = None,
        mixing_weight_decay: float | None = None,
        finalize: bool = False,
        finalize_batches: int = 20,
        calibration_forward: Callable[[nn.Module, Any], Any] | None = None,
        log_mixing_weights: bool = True,
        init: str = "uniform",
        derive: str = "auto",
        monitor: str | None = None,
        monitor_mode: str = "min",
        **options: Unpack[RewriteOptions],
    ) -> None:
        super().__init__(**options)
        _check_learn_options(
            mixing,
            mixing_lr_scale,
            mixing_weight_decay,
            finalize_batches,
            init,
            derive,
            monitor,
            monitor_mode,
        )
        self.derive = derive
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.candidates = candidates
        self.mixing = mixing
        self.mixing_lr_scale = mixing_lr_scale
        self.mixing_weight_decay = mixing_weight_decay
        self.finalize = finalize
        self.finalize_batches = finalize_batches
        self.calibration_forward = calibration_forward or default_calibration_forward
        self.log_mixing_weights = log_mixing_weights
        self.init = init
        self.mixing_history: list[dict[str, Any]] = []
        #: after a fit with ``finalize``: whether the native layers were kept (see ``finalize``)
        self.finalized: bool | None = None
        self._original_configure_optimizers: Any = None
        self._radius_schedule: RadiusSchedule | None = None

    @override
    def _rewrite(
        self, trainer: Trainer, pl_module: nn.Module, found: list[Slot], example: Any
    ) -> None:
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

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        fresh = not self._applied
        super().setup(trainer, pl_module, stage)
        if fresh and (self.mixing_lr_scale is not None or self.mixing_weight_decay is not None):
            self._original_configure_optimizers = wrap_configure_optimizers(
                pl_module, lr_scale=self.mixing_lr_scale, weight_decay=self.mixing_weight_decay
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = sparse_layers(pl_module)
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
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._radius_schedule is not None:
            self._radius_schedule.update(trainer.global_step)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = switchable_layers(pl_module) if self.log_mixing_weights else {}
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
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not switchable_layers(pl_module):
            return  # already finalized (a second fit): nothing to derive or write again
        self.config = learned_config(
            trainer,
            pl_module,
            self.slots,
            self.derive,
            monitor=self.monitor,
            monitor_mode=self.monitor_mode,
        )
        if self.finalize:
            self.finalized = finalize_checked(
                trainer,
                pl_module,
                self.config,
                lambda: _swap_to_native(trainer, pl_module, self),
                monitor=self.monitor,
                monitor_mode=self.monitor_mode,
            )
            self.structure = current_structure(pl_module, self._feeders)
            if self.finalized:
                _resave_last(trainer)
        super().on_fit_end(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._original_configure_optimizers is not None and stage == "fit":
            # the module's own method, as wrap_configure_optimizers found it
            pl_module.configure_optimizers = self._original_configure_optimizers  # type: ignore[method-assign]
            self._original_configure_optimizers = None


def _swap_to_native(trainer: Trainer, pl_module: LightningModule, callback: LearnNorms) -> None:
    """Swap the SwitchableNorms for the derived native layers; recalibrate new BatchNorms."""
    config = callback.config
    assert config is not None
    apply_config(
        pl_module,
        config,
        partial=True,
        example_input=getattr(pl_module, "example_input_array", None),
    )
    new_bns = slot_batchnorms(  # fused norm+activation slots included
        pl_module, [n for n, c in config.choices.items() if c.name == "batchnorm"]
    )
    if new_bns and callback.finalize_batches:
        loader = trainer.train_dataloader
        if loader is None:
            raise AutoNormError(
                "finalize=True needs the training dataloader to recalibrate BatchNorm"
            )
        # on_fit_end runs after Lightning moved the model off an accelerator: its device
        device = next(pl_module.parameters()).device
        batches = (trainer.strategy.batch_to_device(b, device=device) for b in loader)
        used = recalibrate_batchnorm(
            pl_module,
            batches,
            num_batches=callback.finalize_batches,
            forward=callback.calibration_forward,
            modules=new_bns,
        )
        log.info("AutoNorm: recalibrated %d BatchNorm layers on %d batches", len(new_bns), used)


def _resave_last(trainer: Trainer) -> None:
    """The ``last.ckpt`` of each ModelCheckpoint with ``save_last`` saved again: it holds the
    finalized model (its structure and weights), not the SwitchableNorm model of the last
    epoch. Checkpoints ranked by a metric keep what was measured."""
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        path = getattr(callback, "last_model_path", "")
        if getattr(callback, "save_last", False) and path:
            trainer.save_checkpoint(path)
            log.info("AutoNorm: %s saved again with the finalized model", path)
