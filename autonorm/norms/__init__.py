"""The normalization layers autonorm chooses among, and the registry that builds them."""

from __future__ import annotations

from autonorm.norms.groups import default_groups, group_counts
from autonorm.norms.layers import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    LAYOUTS,
    BatchNormChannelsLast,
    BatchNormNd,
    DyT,
    FrozenBatchNorm,
    GroupNormChannelsLast,
    IdentityNorm,
    InstanceNormChannelsLast,
    InstanceNormNd,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
)
from autonorm.norms.registry import (
    NORM_NAMES,
    NormSpec,
    check_choice,
    create_norm,
    get_spec,
)
from autonorm.norms.sparsestmax import sparsestmax, vertex_radius
from autonorm.norms.switchable import SWITCHABLE_CANDIDATES, SWITCHABLE_MIXINGS, SwitchableNorm
from autonorm.norms.sync import SyncBatchNorm
from autonorm.norms.weight import (
    WEIGHT_NAMES,
    WEIGHT_NORMS,
    WeightStandardization,
    set_weight_norm,
    weight_norm_of,
)

__all__ = [
    "CHANNELS_FIRST",
    "CHANNELS_LAST",
    "LAYOUTS",
    "NORM_NAMES",
    "SWITCHABLE_CANDIDATES",
    "SWITCHABLE_MIXINGS",
    "WEIGHT_NAMES",
    "WEIGHT_NORMS",
    "BatchNormChannelsLast",
    "BatchNormNd",
    "DyT",
    "FrozenBatchNorm",
    "GroupNormChannelsLast",
    "IdentityNorm",
    "InstanceNormChannelsLast",
    "InstanceNormNd",
    "LayerNormChannelsFirst",
    "NormSpec",
    "RMSNormChannelsFirst",
    "SwitchableNorm",
    "SyncBatchNorm",
    "WeightStandardization",
    "check_choice",
    "create_norm",
    "default_groups",
    "get_spec",
    "group_counts",
    "set_weight_norm",
    "sparsestmax",
    "vertex_radius",
    "weight_norm_of",
]
