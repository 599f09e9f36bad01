"""Lightning callbacks: :class:`AutoNorm`."""

from __future__ import annotations

from autonorm.callbacks.autonorm import (
    AutoNorm,
    load_from_checkpoint,
    recalibrate_batchnorm,
    split_mixing_group,
)

__all__ = ["AutoNorm", "load_from_checkpoint", "recalibrate_batchnorm", "split_mixing_group"]
