"""A learned SwitchableNorm model's config by perturbation, on the fit's own validation data.

The learned mixing weights rank candidates only as well as the mix moved; a mix that stays
near uniform ranks them by noise. :func:`~autonorm.surgery.perturb_slots` asks the trained
model instead, slot by slot, with validation passes. Those run in a Trainer of their own
after the fit (Lightning calls ``on_fit_end`` after it tore the fit's strategy down), on the
same device, with the fit's validation loaders and its ``limit_val_batches``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from autonorm._errors import AutoNormError
from autonorm._lightning import namespace_of, quiet_lightning
from autonorm.config import NormConfig
from autonorm.surgery import Slot, SlotEvidence, derive_config, perturb_slots

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule, Trainer

log = logging.getLogger(__name__)

#: How the learn mode derives its config: ``"perturbation"`` (validation passes, each slot's
#: candidates forced one at a time), ``"weights"`` (the largest learned mixing weight), or
#: ``"auto"``: perturbation where the fit has validation data and a known monitor, else weights
#: (always for Sparse SN, whose layers end on the one normalizer they trained with).
DERIVE_METHODS = ("auto", "perturbation", "weights")


def validated_value(trainer: Any, module: nn.Module, monitor: str, **data: Any) -> float:
    """``monitor`` after one validation pass of ``trainer`` over ``data`` (its ``datamodule``
    or ``dataloaders``)."""
    metrics = trainer.validate(module, verbose=False, **data)
    value = metrics[0].get(monitor) if metrics else None
    if value is None:
        raise AutoNormError(f"monitor {monitor!r} was not logged in validation")
    return float(value)


def fit_monitor(trainer: Trainer, monitor: str | None, mode: str) -> tuple[str, bool] | None:
    """The metric to perturb on and whether larger is better: ``monitor`` as given, else the
    monitor of the fit's checkpoint or early-stopping callback, else ``val_loss`` where it was
    logged; None when none is known."""
    if monitor is not None:
        return monitor, mode == "max"
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        watched, direction = getattr(callback, "monitor", None), getattr(callback, "mode", None)
        if isinstance(watched, str) and direction in ("min", "max"):
            return watched, direction == "max"
    if "val_loss" in trainer.callback_metrics:
        return "val_loss", False
    return None


def perturbation_unavailable(trainer: Trainer) -> str | None:
    """Why the fit's validation data cannot be perturbed on, or None."""
    if trainer.world_size > 1:
        return f"perturbation validates in one process (this fit ran on {trainer.world_size})"
    if not trainer.val_dataloaders or trainer.limit_val_batches == 0:
        return "the fit has no validation data"
    return None


def fit_validator(
    trainer: Trainer, pl_module: LightningModule, monitor: str
) -> Callable[[nn.Module], float]:
    """``monitor`` after one pass over ``trainer``'s validation loaders, in a Trainer of its
    own (the fit's trainer is given back to the module after each pass)."""
    device = trainer.strategy.root_device
    pl = namespace_of(pl_module)
    with quiet_lightning(True):  # an inner Trainer: its banners would repeat the fit's
        validator: Any = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else device.type,
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision=trainer.precision,
            limit_val_batches=trainer.limit_val_batches,
            logger=False,
            callbacks=[],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=trainer.default_root_dir,
        )
    loaders = trainer.val_dataloaders

    def validate(module: nn.Module) -> float:
        try:
            return validated_value(validator, module, monitor, dataloaders=loaders)
        finally:
            pl_module.trainer = trainer  # the validator attached itself; the fit's is back

    return validate


def perturb_fit(
    trainer: Trainer,
    pl_module: LightningModule,
    slots: Sequence[Slot],
    monitor: str,
    *,
    maximize: bool,
) -> SlotEvidence:
    """Perturb ``pl_module``'s SwitchableNorm slots on ``trainer``'s validation loaders."""
    validate = fit_validator(trainer, pl_module, monitor)
    return perturb_slots(pl_module, slots, validate, maximize=maximize)


#: ``finalize=True`` keeps the native layers only if the validation metric with them is within
#: this share of its value with the SwitchableNorm model (an argmax near a uniform mix, swapped
#: in without training, can collapse a model).
FINALIZE_TOLERANCE = 0.05


def finalize_checked(
    trainer: Trainer,
    pl_module: LightningModule,
    config: NormConfig,
    swap: Callable[[], None],
    *,
    monitor: str | None,
    monitor_mode: str,
) -> bool:
    """Run ``swap`` (the SwitchableNorms to ``config``'s native layers, BatchNorm recalibrated)
    and, where the fit's validation data allows, measure the monitored metric before and after:
    a model worse by more than :data:`FINALIZE_TOLERANCE` gets its SwitchableNorm layers back,
    with a warning naming both values (recorded in ``config.metadata["finalize"]``). Returns
    whether the native layers were kept."""
    watched = fit_monitor(trainer, monitor, monitor_mode)
    if perturbation_unavailable(trainer) is not None or watched is None:
        swap()
        return True
    name, maximize = watched
    validate = fit_validator(trainer, pl_module, name)
    evidence = config.metadata.get("perturbation") or {}
    before = evidence.get("base")  # the SwitchableNorm model, measured by the perturbation
    before = validate(pl_module) if before is None else float(before)
    mixing = {slot: pl_module.get_submodule(slot) for slot in config.choices}
    swap()
    after = validate(pl_module)
    worse = (before - after) if maximize else (after - before)
    kept = math.isfinite(after) and worse <= FINALIZE_TOLERANCE * max(abs(before), 1e-12)
    config.metadata["finalize"] = {"monitor": name, "before": before, "after": after, "kept": kept}
    if kept:
        log.info(
            "AutoNorm: finalized: %s %.4g with SwitchableNorm, %.4g after", name, before, after
        )
        return True
    for slot, module in mixing.items():
        pl_module.set_submodule(slot, module)
    warnings.warn(
        f"AutoNorm: finalize kept the SwitchableNorm model: {name} {before:.4g} with it, "
        f"{after:.4g} with the derived native layers (worse by more than "
        f"{FINALIZE_TOLERANCE:.0%}); train the derived config from scratch "
        "(AutoNorm(config=...)) for a model of native layers",
        stacklevel=2,
    )
    return False


def learned_config(
    trainer: Trainer,
    pl_module: LightningModule,
    slots: Sequence[Slot],
    derive: str,
    *,
    monitor: str | None,
    monitor_mode: str,
) -> NormConfig:
    """The learn mode's config at the end of fit, by ``derive`` (:data:`DERIVE_METHODS`)."""
    learned = derive_config(pl_module)
    if derive == "weights" or (derive == "auto" and learned.learned_mixing == "sparsestmax"):
        return learned  # Sparse SN ends on one normalizer per layer: what it trained with
    watched = fit_monitor(trainer, monitor, monitor_mode)
    reason = perturbation_unavailable(trainer) or (
        None if watched is not None else "no monitor is known (give `monitor`)"
    )
    if reason is not None or watched is None:
        if derive == "perturbation":
            raise AutoNormError(f"derive='perturbation' cannot run: {reason}")
        log.info("AutoNorm: the config follows the learned weights: %s", reason)
        return learned
    name, maximize = watched
    evidence = perturb_fit(trainer, pl_module, slots, name, maximize=maximize)
    log.info("AutoNorm: config by perturbation on %s (%d validation passes)", name, evidence.passes)
    return evidence.decide(learned)
