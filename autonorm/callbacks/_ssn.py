"""Sparse SN's radius schedule: from sparsemax to one normalizer per layer during training.

Sparse SN (Shao et al., CVPR 2019) grows the sparsestmax radius in steps over training, from 0
(sparsemax) to the vertex radius (one-hot). :func:`radius_fraction` is the schedule as a
fraction of each layer's vertex radius; :class:`RadiusSchedule` applies it to a model's Sparse
SN layers, step by step. Both work without Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from autonorm.norms import SwitchableNorm

#: Radius steps after the sparsemax stage, and the part of training after which it is one-hot.
RADIUS_STAGES = 4
RADIUS_END = 0.8


def radius_fraction(
    step: int, total_steps: int, *, stages: int = RADIUS_STAGES, end: float = RADIUS_END
) -> float:
    """The radius, as a fraction of the vertex radius, at optimizer step ``step`` of
    ``total_steps``: 0 (sparsemax) for the first ``end / stages`` of training, then up by
    ``1 / stages`` every ``end / stages``, and 1 (one-hot) from ``end * total_steps`` on.

    Example::

        >>> [radius_fraction(s, 100) for s in (0, 19, 20, 40, 60, 79, 80, 99)]
        [0.0, 0.0, 0.25, 0.5, 0.75, 0.75, 1.0, 1.0]
    """
    if stages < 1 or not 0 < end <= 1:
        raise ValueError(f"need stages >= 1 and 0 < end <= 1, got stages={stages}, end={end}")
    if total_steps < 1:
        return 1.0
    stage = math.floor(step * stages / (end * total_steps) + 1e-9)  # no float shortfall at edges
    return min(1.0, stage / stages)


def sparse_layers(model: nn.Module) -> list[SwitchableNorm]:
    """The model's SwitchableNorm layers that mix with sparsestmax."""
    return [m for m in model.modules() if isinstance(m, SwitchableNorm) and m.radius is not None]


class RadiusSchedule:
    """Sets the radius of Sparse SN layers from the training step (:func:`radius_fraction`).

    Args:
        layers: the layers (see :func:`sparse_layers`).
        total_steps: optimizer steps of the whole training.
    """

    def __init__(self, layers: Iterable[SwitchableNorm], total_steps: int) -> None:
        self.layers = list(layers)
        self.total_steps = total_steps
        self.fraction: float | None = None

    def update(self, step: int) -> float:
        """Set every layer's radius for ``step`` (only when the stage changed); the fraction."""
        fraction = radius_fraction(step, self.total_steps)
        if fraction != self.fraction:
            with torch.no_grad():
                for layer in self.layers:
                    assert layer.radius is not None
                    layer.radius.fill_(fraction * layer.vertex_radius)
            self.fraction = fraction
        return fraction


__all__ = ["RADIUS_END", "RADIUS_STAGES", "RadiusSchedule", "radius_fraction", "sparse_layers"]
