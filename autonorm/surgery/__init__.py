"""Model surgery: find a model's norm slots, rewrite them, and read learned choices back.

Data flows down: :mod:`~autonorm.surgery.derive` and :mod:`~autonorm.surgery.apply` use
:mod:`~autonorm.surgery.slots` (slot discovery), which uses :mod:`~autonorm.surgery.feeders`,
:mod:`~autonorm.surgery.probe` (the probe forward pass) and :mod:`~autonorm.surgery.rebuild`
(building a slot's new layer and carrying its weights).
"""

from __future__ import annotations

from autonorm.surgery.apply import apply_config, to_switchable, validate_config
from autonorm.surgery.derive import (
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
from autonorm.surgery.feeders import FEEDERS_ATTR
from autonorm.surgery.probe import call_with_example
from autonorm.surgery.rebuild import NormWithExtra, build_replacement, keep_choice_of
from autonorm.surgery.recalibrate import default_calibration_forward, recalibrate_batchnorm
from autonorm.surgery.slots import Slot, SlotType, find_slots, register_slot_type, select_slots

__all__ = [
    "CANDIDATE_CHOICES",
    "FAMILIES",
    "FEEDERS_ATTR",
    "SN_CANDIDATES",
    "NormWithExtra",
    "Slot",
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
    "ranked_choices",
    "recalibrate_batchnorm",
    "register_slot_type",
    "select_slots",
    "switchable_choices",
    "switchable_layers",
    "to_switchable",
    "validate_config",
]
