"""A param group of their own for the SwitchableNorm mixing logits.

Sparse SN trains the mixing logits at a smaller learning rate (and without weight decay) than
the rest of the model. :func:`split_mixing_group` moves them out of an optimizer's groups;
:func:`wrap_configure_optimizers` does it inside a LightningModule's ``configure_optimizers``, so
that the groups exist before Lightning restores an optimizer state from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from autonorm._errors import AutoNormError
from autonorm.surgery import switchable_layers

#: Schedulers whose per-group state cannot be extended with a new group.
_CYCLIC_SCHEDULERS = ("OneCycleLR", "CyclicLR")


def optimizers_and_schedulers(result: Any) -> list[tuple[torch.optim.Optimizer, list[Any]]]:
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
            out.extend(optimizers_and_schedulers(item))
        return out
    return []


def _check_schedulers(schedulers: Sequence[Any]) -> None:
    for scheduler in schedulers:
        unsupported = [
            a for a in ("max_lrs", "base_momentums", "max_momentums") if hasattr(scheduler, a)
        ]
        if unsupported or type(scheduler).__name__ in _CYCLIC_SCHEDULERS:
            raise AutoNormError(
                f"mixing_lr_scale cannot extend {type(scheduler).__name__} with a new param group; "
                "leave mixing_lr_scale=None or build the param groups yourself with "
                "autonorm.callbacks.split_mixing_group in configure_optimizers"
            )


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
    entry for the new group.

    Args:
        optimizer: the optimizer, changed in place.
        mixing_ids: ``id()`` of the parameters to move.
        lr_scale: the new group's learning rate relative to its source group's.
        weight_decay: the new group's weight decay (default: the source group's).
        schedulers: the optimizer's schedulers.

    Raises:
        AutoNormError: a scheduler with per-group state autonorm cannot extend.
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
    _check_schedulers(schedulers)
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


def wrap_configure_optimizers(
    pl_module: Any, *, lr_scale: float | None, weight_decay: float | None
) -> Callable[[], Any]:
    """Make ``pl_module.configure_optimizers`` put the mixing logits of its SwitchableNorms in
    a param group of their own (``lr * lr_scale``, ``weight_decay``).

    Returns:
        The original ``configure_optimizers`` (put it back after fit).
    """
    original = pl_module.configure_optimizers
    mixing = {
        id(p)
        for sn in switchable_layers(pl_module).values()
        for p in (sn.mean_weight, sn.var_weight)
    }
    scale = lr_scale or 1.0

    def configure_optimizers() -> Any:
        result = original()
        for optimizer, schedulers in optimizers_and_schedulers(result):
            split_mixing_group(
                optimizer, mixing, lr_scale=scale, weight_decay=weight_decay, schedulers=schedulers
            )
        return result

    pl_module.configure_optimizers = configure_optimizers
    return original
