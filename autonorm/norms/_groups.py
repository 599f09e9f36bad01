"""GroupNorm's group count: the one rule the registry, the search spaces and ``recommend`` share.

Wu & He (Group Normalization, ECCV 2018) use 32 groups, and report that accuracy falls once a
group holds very few channels. A group needs enough values to average over: at least
:data:`MIN_GROUP_SIZE` channels, and :data:`MIN_GROUP_SIZE_NO_POSITIONS` on an ``(N, C)`` input,
where a group has no positions to average over and a small one turns the output into a sign
pattern with exploding gradients (a GN(16) on ``(N, 32)`` features trained at chance).
"""

from __future__ import annotations

#: The most groups (Wu & He's default).
MAX_GROUPS = 32
#: The fewest channels per group on an input with positions (``(N, C, *)``, tokens).
MIN_GROUP_SIZE = 4
#: The fewest channels per group on an ``(N, C)`` input: one value per (sample, channel).
MIN_GROUP_SIZE_NO_POSITIONS = 8


def group_counts(
    num_features: int, max_groups: int = MAX_GROUPS, *, input_ndim: int | None = None
) -> list[int]:
    """The valid GroupNorm group counts for ``num_features`` channels, most groups first.

    A count is valid when it divides ``num_features``, is at most ``max_groups`` and leaves each
    group at least :data:`MIN_GROUP_SIZE` channels (:data:`MIN_GROUP_SIZE_NO_POSITIONS` when
    ``input_ndim`` is 2 or less: an ``(N, C)`` input). One group (the whole sample, a different
    normalization) is offered only when no count of 2 or more is valid.

    Args:
        num_features: the channel count C.
        max_groups: the most groups to offer.
        input_ndim: the rank of the layer's input, when known.

    Returns:
        The counts, most groups first; ``[1]`` when nothing else fits.

    Example::

        >>> group_counts(64), group_counts(96)[:3], group_counts(8), group_counts(3)
        ([16, 8, 4, 2], [24, 16, 12], [2], [1])
        >>> group_counts(32, input_ndim=2)
        [4, 2]
    """
    no_positions = input_ndim is not None and input_ndim <= 2
    min_size = MIN_GROUP_SIZE_NO_POSITIONS if no_positions else MIN_GROUP_SIZE
    counts = [
        g
        for g in range(min(max_groups, num_features), 1, -1)
        if num_features % g == 0 and num_features // g >= min_size
    ]
    return counts or [1]


def default_groups(
    num_features: int, max_groups: int = MAX_GROUPS, *, input_ndim: int | None = None
) -> int:
    """The default group count: the first of :func:`group_counts` (the most valid groups).

    Example::

        >>> default_groups(256), default_groups(64), default_groups(12), default_groups(3)
        (32, 16, 3, 1)
    """
    return group_counts(num_features, max_groups, input_ndim=input_ndim)[0]
