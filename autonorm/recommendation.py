""":func:`autonorm.recommend`: a norm config from established practice, without training.

Each slot gets the choice the literature and the common model zoos settle on for its kind of
input and the run's batch size, and a sentence saying why (kept in the config's metadata under
``reasons``; :func:`format_reasons` lays them out for printing):

- tokens / channels-last features: ``layernorm`` (``rmsnorm`` where the slot already is one);
- ``(N, C)`` features: ``batchnorm``, or ``layernorm`` at a per-device batch of 8 or less;
- conv feature maps: ``batchnorm`` at a per-device batch of 16 or more (or unknown);
  at 8 or less ``syncbatchnorm`` on several devices, else ``groupnorm`` with weight
  standardization on the feeding conv, or, with no conv feeding it and an activation after it,
  ``frn`` (FRN + TLU); 9 to 15: ``batchrenorm`` (``syncbatchnorm`` on several devices); a
  conv slot the architecture gave a per-position LayerNorm (ConvNeXt) keeps it;
- ``task="style"``: ``instancenorm`` for conv slots; ``task="generation"``: ``groupnorm``.

It is a starting point (and a warm-start trial for :func:`autonorm.search`), not a search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from autonorm._errors import AutoNormError
from autonorm.budget import LARGE_BATCH, SMALL_BATCH, Budget, as_budget
from autonorm.config import NormChoice, NormConfig
from autonorm.norms import CHANNELS_LAST, default_groups
from autonorm.surgery import Slot

#: Tasks :func:`recommend` knows. Classification, detection and segmentation follow the
#: default rules (the batch size decides); generation and style change the conv slots.
TASKS = ("classification", "detection", "segmentation", "generation", "style")


def _kind_of_input(slot: Slot) -> str:
    """``"tokens"`` (channels last), ``"features"`` (``(N, C)``: one position per sample and
    channel) or ``"conv"`` (channels first with positions, or an unknown shape)."""
    if slot.layout == CHANNELS_LAST:
        return "tokens"
    if slot.input_shape is not None and math.prod(slot.input_shape[2:]) <= 1:
        return "features"
    return "conv"


def _own(slot: Slot, name: str) -> NormChoice:
    """``name`` as a choice, keeping the slot's own settings (eps, affine) when it already is
    that layer."""
    keep = slot.keep_choice().base
    return keep if keep.name == name else NormChoice(name)


def _batch_text(budget: Budget) -> str:
    text = f"per-device batch {budget.batch_size}"
    return text if budget.devices == 1 else f"{text} on {budget.devices} devices"


def _groups(slot: Slot) -> int:
    """GroupNorm's group count for a slot: the registry's default for its channels and input."""
    ndim = None if slot.input_shape is None else len(slot.input_shape)
    return default_groups(slot.num_features, input_ndim=ndim)


def _groupnorm(slot: Slot, why: str) -> tuple[NormChoice, str]:
    groups = _groups(slot)
    choice = NormChoice("groupnorm", {"groups": groups})
    gn = f"GroupNorm({groups}) is per sample (Wu & He 2018)"
    if slot.feeder is None:
        return choice, (
            f"{why}: {gn}; no Conv/Linear feeds this slot directly, so no weight standardization"
        )
    return choice.with_weight("ws"), (
        f"{why}: {gn}, and Weight Standardization of the feeding layer {slot.feeder!r} closes "
        "most of the gap to large-batch BatchNorm (Qiao et al. 2019)"
    )


def _conv_rule(slot: Slot, budget: Budget | None, task: str | None) -> tuple[NormChoice, str]:
    if task == "style":
        return _own(slot, "instancenorm"), (
            "style task: InstanceNorm removes each image's contrast and style statistics "
            "(Ulyanov et al. 2016; Huang & Belongie 2017)"
        )
    if task == "generation":
        groups = _groups(slot)
        return NormChoice("groupnorm", {"groups": groups}), (
            f"generation task: GroupNorm({groups}) as in diffusion UNets (Ho et al. 2020): per "
            "sample, no batch coupling between generated samples, no train/eval gap"
        )
    if slot.kind in ("layernorm", "rmsnorm"):
        return slot.keep_choice().base, (
            f"the architecture normalizes this feature map over channels at each position "
            f"({slot.kind}, as ConvNeXt's LayerNorm2d, Liu et al. 2022); kept as designed"
        )
    if budget is None or budget.batch_size is None:
        return _own(slot, "batchnorm"), (
            "conv feature map, per-device batch unknown: BatchNorm, the CNN default (Ioffe & "
            "Szegedy 2015); give Budget(batch_size=...) to apply the small-batch rules"
        )
    batch = budget.batch_size
    if batch >= LARGE_BATCH:
        return _own(slot, "batchnorm"), (
            f"conv feature map, {_batch_text(budget)} >= {LARGE_BATCH}: batch statistics are "
            "reliable; BatchNorm (Ioffe & Szegedy 2015)"
        )
    if budget.devices > 1:
        total = batch * budget.devices
        caveat = (
            "" if total >= LARGE_BATCH else f" (still under {LARGE_BATCH}: compare groupnorm+ws)"
        )
        own = slot.kind if slot.kind == "syncbatchnorm" else "batchnorm"
        return NormChoice("syncbatchnorm", _own(slot, own).params), (
            f"conv feature map, {_batch_text(budget)}: SyncBatchNorm takes the statistics over "
            f"the global batch of {total}{caveat} (Peng et al., MegDet 2018)"
        )
    if batch <= SMALL_BATCH:
        why = f"conv feature map, {_batch_text(budget)} <= {SMALL_BATCH} on one device"
        if slot.feeder is None and slot.activation is not None:
            return NormChoice("frn"), (
                f"{why}: FRN + TLU normalizes per sample and channel and replaces the activation "
                f"{slot.activation!r}; it beat BatchNorm and GroupNorm at every batch size on "
                "ImageNet ResNet-50 (Singh & Krishnan 2020); no Conv/Linear feeds this slot "
                "directly, so no weight standardization"
            )
        return _groupnorm(slot, why)
    settings = {
        k: v for k, v in _own(slot, "batchnorm").params.items() if k != "track_running_stats"
    }
    return NormChoice("batchrenorm", settings), (
        f"conv feature map, {_batch_text(budget)}: moderate batch, where BatchNorm starts to "
        f"degrade (Wu & He 2018); Batch Renormalization corrects its batch statistics towards "
        "the running ones and is BatchNorm at inference, foldable (Ioffe 2017)"
    )


def _rule(slot: Slot, budget: Budget | None, task: str | None) -> tuple[NormChoice, str]:
    """One slot's recommendation and the reason for it."""
    kind = _kind_of_input(slot)
    if kind == "tokens":
        if slot.kind == "rmsnorm":
            return slot.keep_choice().base, (
                "tokens / channels-last features, already RMSNorm: kept (Zhang & Sennrich 2019; "
                "the LLaMA-style choice)"
            )
        return _own(slot, "layernorm"), (
            "tokens / channels-last features: LayerNorm, the transformer standard (Ba et al. "
            "2016); per token, independent of the batch"
        )
    if kind == "features":
        batch = None if budget is None else budget.batch_size
        if batch is not None and batch <= SMALL_BATCH:
            return _own(slot, "layernorm"), (
                f"(N, C) features, per-device batch {batch} <= {SMALL_BATCH}: batch statistics "
                "over so few samples are noisy; LayerNorm is per sample (Ba et al. 2016)"
            )
        return _own(slot, "batchnorm"), (
            "(N, C) features"
            + ("" if batch is None else f", per-device batch {batch}")
            + ": BatchNorm1d, as tabular and MLP heads use it (Ioffe & Szegedy 2015)"
        )
    return _conv_rule(slot, budget, task)


def recommend(
    slots: Sequence[Slot],
    budget: Budget | Mapping[str, Any] | None = None,
    *,
    task: str | None = None,
) -> NormConfig:
    """A config from established practice for ``slots``, with each slot's reason.

    Args:
        slots: the model's slots (:func:`autonorm.find_slots`, with an example input so that
            input shapes and feeders are known).
        budget: the run's :class:`~autonorm.Budget` (or its dict): ``batch_size`` (per device)
            and ``devices`` decide the batch-dependent rules. None: batch size unknown.
        task: one of :data:`TASKS`, or None (classification rules).

    Returns:
        A :class:`~autonorm.NormConfig` whose metadata holds ``source: "recommend"``, the task,
        the budget and ``reasons: {slot name: text}``.

    Raises:
        ValueError: unknown task, or a budget that is not a Budget or its dict.
        AutoNormError: no slots.

    Example::

        >>> from autonorm import find_slots
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU())
        >>> slots = find_slots(model, torch.zeros(2, 3, 8, 8))
        >>> recommend(slots, Budget(batch_size=2))["1"].label
        'groupnorm(groups=16)+ws'
        >>> recommend(slots, Budget(batch_size=2, devices=4))["1"].label
        'syncbatchnorm'
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS} or None, got {task!r}")
    budget = as_budget(budget)
    choices: dict[str, NormChoice] = {}
    reasons: dict[str, str] = {}
    for slot in slots:
        choice, reason = _rule(slot, budget, task)
        problems = slot.check(choice)
        if problems:  # a rule that does not fit this slot: keep its layer
            choice = slot.keep_choice()
            reason = f"kept its {slot.kind}: the rule's choice does not fit ({problems[0]})"
        if slot.refusal is not None and choice.base != slot.keep_choice().base:
            choice = slot.keep_choice()
            reason = f"kept its {slot.kind}: autonorm cannot rewrite this slot"
        choices[slot.name] = choice
        reasons[slot.name] = reason
    if not choices:
        raise AutoNormError("no slots to recommend for")
    metadata = {
        "source": "recommend",
        "task": task,
        "budget": None if budget is None else budget.to_dict(),
        "reasons": reasons,
    }
    return NormConfig(choices, metadata=metadata).with_probe(s for s in slots if s.name in choices)


def format_reasons(config: NormConfig) -> str:
    """The config's choices and reasons as aligned lines, one slot a line (``slot  choice  reason``).

    Example::

        >>> cfg = NormConfig({"bn": "batchnorm"}, metadata={"reasons": {"bn": "big batch"}})
        >>> print(format_reasons(cfg))
        bn  batchnorm  big batch
    """
    reasons = config.metadata.get("reasons") or {}
    rows = [
        (name or "<root>", choice.label, reasons.get(name, ""))
        for name, choice in config.choices.items()
    ]
    if not rows:
        return ""
    width_name = max(len(r[0]) for r in rows)
    width_label = max(len(r[1]) for r in rows)
    return "\n".join(
        f"{name:<{width_name}}  {label:<{width_label}}  {reason}".rstrip()
        for name, label, reason in rows
    )
