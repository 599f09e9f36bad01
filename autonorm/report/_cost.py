"""What each chosen norm layer costs at inference on this machine, and after folding.

For each slot of a config the chosen layer is built for the slot's channels and layout and
timed in eval mode on a random input of the shape the probe saw (best of a few forwards under
``torch.inference_mode``, on the CPU). A batch norm (or frozen batch norm) with a Conv/Linear
feeding it folds into that layer at deploy (:func:`autonorm.fold_norms`) and costs nothing then:
the folded total is the sum over the slots that do not fold.

The slots come from the study's record of the probe (``{name, num_features, layout,
input_shape, feeder}``); a slot recorded without an input shape is left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

import torch

from autonorm.config import NormChoice
from autonorm.deploy import FOLDABLE_KINDS
from autonorm.report._format import esc
from autonorm.report._types import InferenceCost, SlotCost, SlotInfo, StoredChoice

log = logging.getLogger(__name__)

#: Forwards timed per slot; the best one counts.
REPS = 5


def _best_ms(layer: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        layer(x)  # warm-up
        for _ in range(reps):
            start = time.perf_counter()
            layer(x)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def _slot_cost(slot: SlotInfo, value: StoredChoice | NormChoice, reps: int) -> SlotCost | None:
    from autonorm.norms import create_norm

    shape = slot.get("input_shape")
    if not shape:
        return None
    choice = NormChoice.parse(value)
    layer = create_norm(
        choice.name,
        int(slot["num_features"]),
        layout=slot["layout"],
        input_ndim=len(shape),
        **choice.params,
    ).eval()
    ms = _best_ms(layer, torch.randn(*shape), reps)
    folds = choice.name in FOLDABLE_KINDS and slot.get("feeder") is not None
    return SlotCost(choice=choice.label, input_shape=list(shape), ms=ms, folds=folds)


def inference_cost(
    slots: Iterable[SlotInfo] | None,
    config: Mapping[str, StoredChoice | NormChoice] | None,
    *,
    reps: int = REPS,
) -> InferenceCost | None:
    """Per-slot inference milliseconds of ``config``'s choices, and the totals.

    Args:
        slots: the study's slot records (``name``, ``num_features``, ``layout``,
            ``input_shape``, ``feeder``).
        config: ``{slot name: choice}`` (labels or :class:`NormChoice` values).
        reps: forwards timed per slot.

    Returns:
        ``{"device", "slots": {name: {choice, input_shape, ms, folds}}, "total_ms",
        "folded_total_ms"}``, or None without a config or without recorded input shapes.
    """
    if not config or not slots:
        return None
    records = {str(s["name"]): s for s in slots if isinstance(s, Mapping) and "name" in s}
    costs: dict[str, SlotCost] = {}
    for name, value in config.items():
        record = records.get(name)
        try:
            cost = None if record is None else _slot_cost(record, value, reps)
        except (ValueError, TypeError, KeyError) as err:  # a study autonorm did not write
            log.warning("no inference cost for slot %r (%s): %s", name, value, err)
            cost = None
        if cost is not None:
            costs[name] = cost
    if not costs:
        return None
    return InferenceCost(
        device=f"cpu, {torch.get_num_threads()} threads",
        slots=costs,
        total_ms=sum(c["ms"] for c in costs.values()),
        folded_total_ms=sum(c["ms"] for c in costs.values() if not c["folds"]),
    )


def cost_table_html(cost: InferenceCost | None) -> str:
    """The report's table of :func:`inference_cost` (empty without one)."""
    if not cost:
        return ""
    rows = [
        f"<tr><td>{esc(name)}</td><td>{esc(c['choice'])}</td><td>{esc(tuple(c['input_shape']))}"
        f"</td><td>{c['ms']:.3f}</td><td>{'folds into its feeder' if c['folds'] else ''}</td></tr>"
        for name, c in cost["slots"].items()
    ]
    head = "<tr><th>slot</th><th>choice</th><th>input</th><th>inference ms</th><th>deploy</th></tr>"
    total = (
        f"<p>all norms {cost['total_ms']:.3f} ms a forward; folded for deploy "
        f"{cost['folded_total_ms']:.3f} ms ({esc(cost['device'])}, best of {REPS})</p>"
    )
    return f"<h3>Inference cost of the chosen norms</h3><table>{head}{''.join(rows)}</table>{total}"
