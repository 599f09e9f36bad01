"""The one GroupNorm group-count rule, and the registry's default built from it."""

from __future__ import annotations

import pytest

from autonorm.norms import create_norm, default_groups, group_counts


@pytest.mark.parametrize(
    ("channels", "counts"),
    [
        (3, [1]),  # fewer than 4 channels: one group is all that fits
        (4, [1]),
        (8, [2]),
        (12, [3, 2]),
        (64, [16, 8, 4, 2]),
        (96, [24, 16, 12, 8, 6, 4, 3, 2]),
        (512, [32, 16, 8, 4, 2]),
    ],
)
def test_counts_divide_keep_four_channels_a_group_and_at_most_32_groups(channels, counts):
    assert group_counts(channels) == counts
    assert default_groups(channels) == counts[0]


def test_an_input_without_positions_keeps_eight_channels_a_group():
    # a GN(16) on (N, 32) features trained at chance: 2 values a group are a sign pattern
    assert group_counts(32, input_ndim=2) == [4, 2]
    assert group_counts(32, input_ndim=4) == [8, 4, 2]
    assert group_counts(8, input_ndim=2) == [1]


def test_max_groups_caps_the_count():
    assert group_counts(256, 8) == [8, 4, 2]
    assert default_groups(64, max_groups=4) == 4


@pytest.mark.parametrize(("ndim", "groups"), [(None, 16), (4, 16), (2, 8)])
def test_the_registry_default_is_the_rules_first_count(ndim, groups):
    layer = create_norm("groupnorm", 64, input_ndim=ndim)
    assert layer.num_groups == groups
    assert create_norm("groupnorm", 64, groups=32).num_groups == 32  # an explicit count stays
