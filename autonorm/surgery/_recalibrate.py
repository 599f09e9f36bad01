"""BatchNorm recalibration: recompute running statistics with forward passes.

Plain functions on an ``nn.Module`` (no Lightning): the callback's ``finalize`` uses them after
swapping SwitchableNorms for native BatchNorms, and so can a user after :func:`apply_config`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from autonorm.norms import SwitchableNorm
from autonorm.surgery._rebuild import inner


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


def slot_batchnorms(
    model: nn.Module, names: Iterable[str]
) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers in the slots ``names``: the slot's layer, or the norm of a fused
    slot (a norm+activation subclass rebuilt as a :class:`~autonorm.surgery._rebuild.NormWithExtra`),
    each once."""
    found: list[nn.modules.batchnorm._BatchNorm] = []
    for name in names:
        module = inner(model.get_submodule(name))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module not in found:
            found.append(module)
    return found


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int = 20,
    forward: Callable[[nn.Module, Any], Any] = default_calibration_forward,
    modules: Sequence[nn.modules.batchnorm._BatchNorm | SwitchableNorm] | None = None,
) -> int:
    """Recompute BatchNorm running statistics with forward passes (cumulative averages).

    Only the BatchNorm layers are in training mode meanwhile: dropout and the rest stay in
    eval mode; every module's train/eval flag is restored afterwards.

    Args:
        model: the model to run.
        batches: the batches to feed (only the first ``num_batches`` are used).
        num_batches: how many batches to average over.
        forward: ``f(model, batch)`` running one batch.
        modules: the BatchNorm layers to recalibrate (default: every one of ``model``), or
            SwitchableNorms, whose batch branch's running statistics are recomputed.

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


__all__ = ["default_calibration_forward", "recalibrate_batchnorm", "slot_batchnorms"]
