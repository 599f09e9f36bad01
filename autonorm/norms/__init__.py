"""``autonorm.norms``: the normalization layers autonorm chooses among, and the registry that
builds them. Nothing here knows about models, slots or searches.

Modules: ``_registry`` (:func:`create_norm`, each choice's :class:`NormSpec` and the validation of
its parameters), ``_layers`` (layout-aware Batch/Group/Instance/Layer/RMS norms, DyT, identity),
``_switchable`` (:class:`SwitchableNorm`; its fused statistics in ``_switchable_ops``) and
``_sparsestmax`` (Sparse SN's projection), ``_small_batch`` (Batch Renormalization, FRN + TLU,
EvoNorm-S0), ``_sync`` (:class:`SyncBatchNorm` in both layouts),
``_weight`` (weight standardization and weight norm on a feeding Conv/Linear), ``_groups`` (the
GroupNorm group counts offered), ``_fast_ops`` (fused autograd functions behind the layers).
"""

from __future__ import annotations

from autonorm.norms._groups import default_groups, group_counts
from autonorm.norms._layers import (
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
    check_layout,
)
from autonorm.norms._registry import (
    COMMON_PARAMS,
    NORM_NAMES,
    NormSpec,
    check_choice,
    check_params,
    create_norm,
    get_spec,
)
from autonorm.norms._small_batch import BatchRenorm, EvoNormS0, FilterResponseNorm
from autonorm.norms._sparsestmax import sparsestmax, vertex_radius
from autonorm.norms._switchable import (
    SWITCHABLE_CANDIDATES,
    SWITCHABLE_MIXINGS,
    MixingWeights,
    SwitchableNorm,
)
from autonorm.norms._sync import SyncBatchNorm
from autonorm.norms._weight import (
    WEIGHT_NAMES,
    WEIGHT_NORMS,
    WeightStandardization,
    check_weight,
    filter_dim,
    is_feeder,
    output_channels,
    set_weight_norm,
    tagged_slot,
    weight_norm_of,
    weight_problems,
)

__all__ = [
    "COMMON_PARAMS",
    "check_layout",
    "check_params",
    "check_weight",
    "filter_dim",
    "is_feeder",
    "output_channels",
    "tagged_slot",
    "weight_problems",
    "CHANNELS_FIRST",
    "CHANNELS_LAST",
    "LAYOUTS",
    "MixingWeights",
    "NORM_NAMES",
    "SWITCHABLE_CANDIDATES",
    "SWITCHABLE_MIXINGS",
    "WEIGHT_NAMES",
    "WEIGHT_NORMS",
    "BatchNormChannelsLast",
    "BatchRenorm",
    "EvoNormS0",
    "FilterResponseNorm",
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
