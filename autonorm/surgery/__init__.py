"""``autonorm.surgery``: find a model's norm slots, rewrite them, and read learned choices back.
Works on any ``nn.Module``, without Lightning.

Data flows down: ``_perturb`` (per-slot evidence from a trained SwitchableNorm model, by
forcing each slot's candidates one at a time) uses ``_derive`` (a config from learned
SwitchableNorm weights); ``_derive`` and ``_apply``
(:func:`apply_config`, :func:`to_switchable`) use ``_slots`` (:func:`find_slots`, :class:`Slot`),
which uses ``_detect`` (which layers are norms), ``_feeders`` (the Conv/Linear feeding a slot),
``_probe`` (the probe forward pass) and ``_rebuild`` (a slot's new layer, its weights carried
over); ``_recalibrate`` recomputes BatchNorm statistics after a rewrite.
"""

from __future__ import annotations

from autonorm.surgery._apply import SWITCHABLE_INITS, apply_config, to_switchable, validate_config
from autonorm.surgery._derive import (
    CANDIDATE_CHOICES,
    FAMILIES,
    SN_CANDIDATES,
    candidate_scores,
    derive_config,
    family,
    ranked_choices,
    switchable_choices,
    switchable_layers,
)
from autonorm.surgery._feeders import FEEDERS_ATTR
from autonorm.surgery._perturb import SlotEvidence, perturb_slots
from autonorm.surgery._probe import call_with_example
from autonorm.surgery._rebuild import NormWithExtra, build_replacement, keep_choice_of
from autonorm.surgery._recalibrate import (
    default_calibration_forward,
    recalibrate_batchnorm,
    slot_batchnorms,
)
from autonorm.surgery._slot_types import SlotType, register_slot_type
from autonorm.surgery._slots import Slot, SlotPatterns, find_slots, select_slots

__all__ = [
    "SWITCHABLE_INITS",
    "slot_batchnorms",
    "CANDIDATE_CHOICES",
    "FAMILIES",
    "FEEDERS_ATTR",
    "SN_CANDIDATES",
    "NormWithExtra",
    "Slot",
    "SlotEvidence",
    "SlotPatterns",
    "SlotType",
    "apply_config",
    "build_replacement",
    "call_with_example",
    "candidate_scores",
    "default_calibration_forward",
    "derive_config",
    "family",
    "find_slots",
    "keep_choice_of",
    "perturb_slots",
    "ranked_choices",
    "recalibrate_batchnorm",
    "register_slot_type",
    "select_slots",
    "switchable_choices",
    "switchable_layers",
    "to_switchable",
    "validate_config",
]
