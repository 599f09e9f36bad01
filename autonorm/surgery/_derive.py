"""The learned path read back: from trained SwitchableNorm layers to a discrete config.

The one map between SwitchableNorm candidates and norm choices lives here: each candidate's
native choice (what :func:`derive_config` picks) and the family of registry names whose
statistics its learned weight speaks for (:func:`family`, what the warm start narrows by), and
the one score of a candidate (:func:`candidate_scores`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from torch import nn

from autonorm._errors import AutoNormError
from autonorm.config import LEARNED_MIXING, LEARNED_WEIGHTS, NormChoice, NormConfig
from autonorm.norms import MixingWeights, SwitchableNorm, check_choice
from autonorm.surgery._rebuild import inner
from autonorm.surgery._slots import Slot, find_slots


class Candidate(NamedTuple):
    """What a SwitchableNorm candidate stands for at one layout."""

    #: the native choice computing the same statistics
    native: NormChoice
    #: the registry names whose statistics the candidate's learned weight speaks for
    family: tuple[str, ...]


#: SwitchableNorm candidate -> what it stands for, per layout.
SN_CANDIDATES: dict[str, dict[str, Candidate]] = {
    "channels_first": {
        "instance": Candidate(NormChoice("instancenorm"), ("instancenorm",)),
        # per sample over (C, positions)
        "layer": Candidate(
            NormChoice("groupnorm", {"groups": 1}), ("groupnorm", "layernorm", "rmsnorm")
        ),
        "batch": Candidate(NormChoice("batchnorm"), ("batchnorm", "syncbatchnorm")),
    },
    "channels_last": {
        "layer": Candidate(NormChoice("layernorm"), ("layernorm",)),
        "rms": Candidate(NormChoice("rmsnorm"), ("rmsnorm",)),
        "batch": Candidate(NormChoice("batchnorm"), ("batchnorm", "syncbatchnorm")),
    },
}

#: SwitchableNorm candidate -> the native choice computing the same statistics, per layout.
CANDIDATE_CHOICES: dict[str, dict[str, NormChoice]] = {
    layout: {name: candidate.native for name, candidate in table.items()}
    for layout, table in SN_CANDIDATES.items()
}

#: A choice's registry name -> the SwitchableNorm candidate computing the closest statistics.
FAMILIES: dict[str, dict[str, str]] = {
    layout: {member: name for name, candidate in table.items() for member in candidate.family}
    for layout, table in SN_CANDIDATES.items()
}


def family(choice: NormChoice, layout: str) -> str | None:
    """The SN candidate whose learned weight speaks for ``choice`` (None: no such candidate)."""
    return FAMILIES[layout].get(choice.name)


def candidate_scores(weights: MixingWeights) -> dict[str, float]:
    """Mean of the learned mean- and variance-weights per candidate.

    Args:
        weights: ``{"mean": {candidate: w}, "var": {candidate: w}}``, as
            :meth:`SwitchableNorm.mixing_weights` gives them.
    """
    return {c: (weights["mean"][c] + weights["var"][c]) / 2 for c in weights["mean"]}


def switchable_layers(model: nn.Module) -> dict[str, SwitchableNorm]:
    """Slot name -> the SwitchableNorm in that slot."""
    out = {}
    for slot in find_slots(model, probe=False):
        module = inner(model.get_submodule(slot.name))
        if isinstance(module, SwitchableNorm):
            out[slot.name] = module
    return out


def ranked_choices(sn: SwitchableNorm) -> list[tuple[NormChoice, float]]:
    """The native choices of an SN layer's candidates, by learned weight (mean and variance
    weights averaged), highest first."""
    scores = candidate_scores(sn.mixing_weights())
    order = sorted(sn.candidates, key=lambda c: -scores[c])
    return [(CANDIDATE_CHOICES[sn.layout][c], scores[c]) for c in order]


def _valid_for(choice: NormChoice, slot: Slot) -> bool:
    """Whether ``choice`` can normalize ``slot``'s input (instance statistics need positions)."""
    return not check_choice(
        choice.name,
        slot.num_features,
        layout=slot.layout,
        input_shape=slot.input_shape,
        **choice.params,
    )


def valid_candidates(sn: SwitchableNorm, slot: Slot) -> list[tuple[str, NormChoice]]:
    """The SN layer's candidates whose native choice is valid for ``slot``, with that choice."""
    table = CANDIDATE_CHOICES[sn.layout]
    return [(c, table[c]) for c in sn.candidates if _valid_for(table[c], slot)]


def derived_choice(sn: SwitchableNorm, slot: Slot) -> NormChoice:
    """The native choice of the SN layer in ``slot``: its highest-weighted candidate valid for
    the slot's input (instance statistics need positions), with the slot's weight-side part."""
    ranked = ranked_choices(sn)
    valid = [c for c, _ in ranked if _valid_for(c, slot)]
    # the weight side stays: SN learned its weights with what the feeder carries
    return (valid[0] if valid else ranked[0][0]).with_weight(slot.keep_choice().weight)


def switchable_choices(model: nn.Module, slots: Iterable[Slot]) -> dict[str, NormChoice]:
    """The derived choice of each slot in ``slots`` that holds a SwitchableNorm with finite
    mixing weights (a diverged layer says nothing): what a run's SN layers weigh highest so
    far. The slots are looked up by name, not found again: cheap enough for every epoch."""
    choices = {}
    for slot in slots:
        sn = inner(model.get_submodule(slot.name))
        if isinstance(sn, SwitchableNorm) and _finite(sn.mixing_weights()):
            choices[slot.name] = derived_choice(sn, slot)
    return choices


def derive_config(model: nn.Module, *, example_input: Any = None) -> NormConfig:
    """The discrete config learned by the model's SwitchableNorm layers.

    Each slot takes the candidate with the largest learned weight (mean and variance weights
    averaged), mapped to its native layer: ``instance`` -> instancenorm, ``layer`` ->
    groupnorm(groups=1) (channels first) or layernorm (channels last), ``rms`` -> rmsnorm,
    ``batch`` -> batchnorm. A candidate invalid for the slot's input (instance statistics of an
    ``(N, C)`` input) is passed over. A slot's weight-side part (``+ws``/``+wn`` on its feeder)
    is kept. The learned weights and how they were mixed are recorded in the metadata
    (:attr:`NormConfig.learned_weights`, :attr:`NormConfig.learned_mixing`).

    Raises:
        AutoNormError: the model has no SwitchableNorm, or some learned weights are not finite
            (a diverged run: no candidate can be told best).
    """
    slots = {s.name: s for s in find_slots(model, example_input)}
    layers = switchable_layers(model)
    if not layers:
        raise AutoNormError(
            f"{type(model).__name__} has no SwitchableNorm: convert it with autonorm.to_switchable "
            "(or train with AutoNorm(mode='learn')) first"
        )
    weights = {name: sn.mixing_weights() for name, sn in layers.items()}
    _check_finite(weights)
    choices = {name: derived_choice(sn, slots[name]) for name, sn in layers.items()}
    mixings = sorted({sn.mixing for sn in layers.values()})
    metadata = {
        "source": "switchable",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        LEARNED_WEIGHTS: weights,
        LEARNED_MIXING: "+".join(mixings),  # one name, unless the layers mixed differently
    }
    return NormConfig(choices, metadata=metadata).with_probe(slots[name] for name in choices)


def _finite(weights: MixingWeights) -> bool:
    return all(math.isfinite(w) for per_cand in weights.values() for w in per_cand.values())


def _check_finite(weights: Mapping[str, MixingWeights]) -> None:
    """Refuse NaN/inf mixing weights (a diverged learn run): sorting them would pick a candidate
    at random, silently."""
    bad = [name for name, per_kind in weights.items() if not _finite(per_kind)]
    if bad:
        raise AutoNormError(
            f"the learned mixing weights of {len(bad)} slot(s) are not finite (the learn run "
            f"diverged): {', '.join(repr(n) for n in bad)}; lower the learning rate or "
            "mixing_lr_scale, or search without warm_start='learn'"
        )
