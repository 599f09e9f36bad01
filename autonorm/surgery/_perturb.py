"""Per-slot evidence from a trained SwitchableNorm model, by perturbation.

A SwitchableNorm layer's mixing weight is not its candidates' strength: a mix near uniform says
nothing, and a candidate can weigh little yet matter (Wang et al., ICLR 2021, "Rethinking
Architecture Selection in Differentiable NAS"). Perturbation asks the trained model instead:
each slot in turn computes with one candidate alone (its mixing exactly one-hot, the other
slots as trained), and the validation metric says what that candidate is worth there. Slots
are decided progressively, the most decided first (the largest spread between its candidates):
each round decides the more decided half of the open slots, which stay on their candidates
while the others are measured again, so later choices account for earlier ones. It costs
validation passes (about twice the slots times the candidates), not training.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from autonorm.config import NormChoice, NormConfig
from autonorm.norms import SwitchableNorm
from autonorm.surgery._derive import valid_candidates
from autonorm.surgery._rebuild import inner
from autonorm.surgery._slots import Slot


@dataclass(frozen=True)
class SlotEvidence:
    """What perturbing a trained SwitchableNorm model said.

    Attributes:
        base: the metric of the model as trained (every slot mixing).
        scores: per slot, the metric with the slot on each candidate alone (native choice
            labels), measured with the slots decided before it on their choices.
        order: the slots in the order they were decided.
        choices: each slot's best candidate, as its native choice.
        joint: the metric with every slot on its chosen candidate.
        passes: validation passes spent.
    """

    base: float
    scores: dict[str, dict[str, float]]
    order: list[str]
    choices: dict[str, NormChoice]
    joint: float
    passes: int

    def config(self) -> NormConfig:
        """The discrete config the perturbation chose, its evidence in the metadata."""
        return NormConfig(
            dict(self.choices),
            metadata={"source": "perturbation", "base": self.base, "joint": self.joint},
        )

    def record(self) -> dict[str, Any]:
        """The evidence as plain values (a config's metadata, a study's attributes)."""
        return {
            "base": self.base,
            "joint": self.joint,
            "passes": self.passes,
            "order": list(self.order),
            "slots": {slot: dict(per_choice) for slot, per_choice in self.scores.items()},
        }

    def decide(self, learned: NormConfig) -> NormConfig:
        """``learned`` (derived from the mixing weights, :func:`~autonorm.derive_config`) with
        the perturbation's choices; its metadata keeps the learned record and adds this
        evidence (``derived_by``, ``perturbation``)."""
        metadata = {**learned.metadata, "derived_by": "perturbation", "perturbation": self.record()}
        return NormConfig({**learned.choices, **self.choices}, metadata=metadata)


class _Measured(NamedTuple):
    candidate: str
    choice: NormChoice
    value: float


@contextlib.contextmanager
def _only(layers: Mapping[str, tuple[SwitchableNorm, str]]) -> Iterator[None]:
    """Every ``(layer, candidate)`` of ``layers`` computes with that candidate alone."""
    with contextlib.ExitStack() as stack:
        for layer, candidate in layers.values():
            stack.enter_context(layer.only(candidate))
        yield


def perturb_slots(
    model: nn.Module,
    slots: Sequence[Slot],
    validate: Callable[[nn.Module], float],
    *,
    maximize: bool,
) -> SlotEvidence:
    """Decide each SwitchableNorm slot of ``slots`` by perturbation (see the module's doc).

    Args:
        model: the trained model, its slots holding SwitchableNorm layers.
        slots: the slots to decide (those without a SwitchableNorm are left out).
        validate: the model's validation metric (one pass over the validation data).
        maximize: whether a larger metric is better.

    Raises:
        ValueError: no slot of ``slots`` holds a SwitchableNorm.
    """
    sign = 1.0 if maximize else -1.0
    layers: dict[str, tuple[SwitchableNorm, Slot]] = {}
    for slot in slots:
        layer = inner(model.get_submodule(slot.name))
        if isinstance(layer, SwitchableNorm):
            layers[slot.name] = (layer, slot)
    if not layers:
        raise ValueError("no slot holds a SwitchableNorm layer: nothing to perturb")
    base = validate(model)
    passes = 1
    decided: dict[str, tuple[SwitchableNorm, str]] = {}
    choices: dict[str, NormChoice] = {}
    scores: dict[str, dict[str, float]] = {}
    order: list[str] = []
    while len(decided) < len(layers):
        measured: dict[str, list[_Measured]] = {}
        with _only(decided):
            for name, (layer, slot) in layers.items():
                if name in decided:
                    continue
                measured[name] = []
                for candidate, choice in valid_candidates(layer, slot):
                    with layer.only(candidate):
                        measured[name].append(_Measured(candidate, choice, validate(model)))
                    passes += 1
        # the more decided half first: the largest spread between a slot's candidates
        ranked = sorted(measured, key=lambda n: -_spread(measured[n]))
        for name in ranked[: max(1, len(ranked) // 2)]:
            best = max(measured[name], key=lambda m: _ranked(sign * m.value))
            decided[name] = (layers[name][0], best.candidate)
            choices[name] = best.choice.with_weight(layers[name][1].keep_choice().weight)
            scores[name] = {m.choice.label: m.value for m in measured[name]}
            order.append(name)
    with _only(decided):
        joint = validate(model)
    return SlotEvidence(base, scores, order, choices, joint, passes + 1)


def _ranked(value: float) -> float:
    """A score to maximize: a non-finite metric ranks last."""
    return value if math.isfinite(value) else -math.inf


def _spread(measured: Sequence[_Measured]) -> float:
    values = [m.value for m in measured if math.isfinite(m.value)]
    return max(values) - min(values) if len(values) > 1 else -math.inf
