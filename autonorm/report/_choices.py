"""The report's figures about the choices: how much each searched parameter matters, and which
choice won in each slot."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from autonorm._trial_keys import PERTURBATION
from autonorm.report._figures import COLORS
from autonorm.report._format import choice_label, esc
from autonorm.report._summary import FINISHED, trial_config
from autonorm.report._types import StudyInfo, slot_records
from autonorm.report._winners import better, feasible_complete, maximizes

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

# -- importance --------------------------------------------------------------------------------


#: The fewest distinct configs among the feasible complete trials that an importance estimate
#: is drawn from (and at least two per searched parameter): below that, optuna's forest of
#: trees fits a handful of points and its bars are noise presented as a finding.
MIN_IMPORTANCE_CONFIGS = 10


def importance_basis(trials: Sequence[FrozenTrial]) -> tuple[list[FrozenTrial], set[str]]:
    """The feasible complete trials an importance estimate rests on and the parameters they
    share.

    Raises:
        ValueError: (saying why) no shared parameter, or fewer distinct configs than
            :data:`MIN_IMPORTANCE_CONFIGS` and than two per parameter; repeated runs of one
            config say nothing about which slot matters.
    """
    feasible = feasible_complete(trials)
    common = set(feasible[0].params) if feasible else set()
    for t in feasible[1:]:
        common &= set(t.params)
    if feasible and not common:
        raise ValueError("the feasible complete trials share no parameter")
    configs = {tuple(sorted((k, repr(t.params[k])) for k in common)) for t in feasible}
    needed = max(MIN_IMPORTANCE_CONFIGS, 2 * len(common))
    if len(configs) < needed:
        raise ValueError(
            f"it needs at least {needed} distinct configs among the feasible complete trials "
            f"(two per searched parameter, at least {MIN_IMPORTANCE_CONFIGS}); this study has "
            f"{len(configs)} in {len(feasible)} trial(s), too few to tell which slot matters"
        )
    return feasible, common


def importances(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, float]:
    """Parameter importances for the first objective, over the feasible COMPLETE trials only
    (copied into an in-memory study, so that trials over the budget do not count).

    Raises:
        ValueError: too few configs to estimate from (:func:`importance_basis`).
    """
    feasible, common = importance_basis(trials)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        scratch = optuna.create_study(direction=study.directions[0])
        for t in feasible:
            scratch.add_trial(
                optuna.trial.create_trial(
                    params={k: t.params[k] for k in common},
                    distributions={k: t.distributions[k] for k in common},
                    value=t.values[0],
                )
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental and few-trial warnings: report only
            return optuna.importance.get_param_importances(scratch)
    finally:
        optuna.logging.set_verbosity(verbosity)


def importance_figure(importances: dict[str, float], name: str) -> Figure:
    """Horizontal bars, the most important parameter on top."""
    import plotly.graph_objects as go

    ordered = sorted(importances.items(), key=lambda kv: kv[1])
    fig = go.Figure(
        go.Bar(
            x=[v for _, v in ordered],
            y=[k for k, _ in ordered],
            orientation="h",
            marker={"color": COLORS["complete"]},
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis={"title": {"text": f"importance for {name} (sums to 1)"}},
        yaxis={"automargin": True},
    )
    return fig


# -- which choice won, per slot ----------------------------------------------------------------


def slot_order(info: StudyInfo, trials: Sequence[FrozenTrial]) -> list[str]:
    """The slots in the order the study's settings list them, then those only trials name."""
    slots = list(slot_records(info.get("slots")))
    for t in trials:
        for name in trial_config(t):
            if name not in slots:
                slots.append(name)
    return slots


@dataclass
class _ChoiceStats:
    """Per (slot, choice label): how often finished trials tried it and the best value (with
    its trial) among the feasible complete ones."""

    maximize: bool
    choices: set[str] = field(default_factory=set)
    tried: Counter[tuple[str, str]] = field(default_factory=Counter)
    best: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)

    @classmethod
    def collect(cls, study: optuna.Study, trials: Sequence[FrozenTrial]) -> _ChoiceStats:
        stats = cls(maximizes(study))
        feasible = {t.number for t in feasible_complete(trials)}
        for t in trials:
            if t.state not in FINISHED:
                continue
            for slot, value in trial_config(t).items():
                key = (slot, choice_label(value))
                stats.choices.add(key[1])
                stats.tried[key] += 1
                if t.number in feasible:
                    stats.offer(key, t.values[0], t.number)
        return stats

    def offer(self, key: tuple[str, str], value: float, trial: int) -> None:
        old = self.best.get(key)
        if better(value, None if old is None else old[0], self.maximize):
            self.best[key] = (value, trial)


def _choice_cell(
    stats: _ChoiceStats, slot: str, choice: str, chosen: bool
) -> tuple[float | None, str, str]:
    """(value, cell text, hover text) of one heatmap cell; ``chosen``: the chosen config's."""
    n = stats.tried.get((slot, choice), 0)
    cell = stats.best.get((slot, choice))
    if cell is None:
        status = "not tried" if n == 0 else f"tried {n}x, no feasible result"
        return None, "" if n == 0 else "x", f"{esc(slot)}<br>{esc(choice)}<br>{status}"
    star = " ★" if chosen else ""
    hover = (
        f"{esc(slot)}<br>{esc(choice)}{' (chosen)' if chosen else ''}<br>best {cell[0]:.6g} "
        f"(trial {cell[1]})<br>tried in {n} finished trials"
    )
    return cell[0], f"{cell[0]:.4g}{star}", hover


def choice_map(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    slots: list[str],
    chosen: Mapping[str, Any] | None = None,
) -> tuple[list[str], list[list[float | None]], list[list[str]], list[list[str]]]:
    """(choices, best value, cell text, hover text) per slot and choice: the best first-objective
    value among the feasible COMPLETE trials that gave the slot that choice; the ``chosen``
    config's choice of each slot starred (the search chose on paired runs, not on the best
    single value a cell shows)."""
    stats = _ChoiceStats.collect(study, trials)
    columns = sorted(stats.choices)
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    hover: list[list[str]] = []
    picked = {slot: choice_label(value) for slot, value in (chosen or {}).items()}
    for slot in slots:
        cells = [_choice_cell(stats, slot, c, picked.get(slot) == c) for c in columns]
        z.append([c[0] for c in cells])
        text.append([c[1] for c in cells])
        hover.append([c[2] for c in cells])
    return columns, z, text, hover


def choice_map_figure(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    slots: list[str],
    name: str,
    chosen: Mapping[str, Any] | None = None,
) -> Figure | None:
    """A slot x choice heatmap of :func:`choice_map` (None without slots or choices)."""
    columns, z, text, hover = choice_map(study, trials, slots, chosen)
    if not columns or not slots:
        return None
    return _slot_heatmap(z, columns, slots, text, f"best {name}", maximizes(study), hover=hover)


def perturbation_evidence(trials: Sequence[FrozenTrial]) -> tuple[FrozenTrial, dict] | None:
    """The first trial whose SwitchableNorm model was perturbed, and what that recorded."""
    for trial in trials:
        evidence = trial.user_attrs.get(PERTURBATION)
        if isinstance(evidence, dict) and evidence.get("slots"):
            return trial, evidence
    return None


def perturbation_figure(evidence: dict, chosen: dict, name: str, maximize: bool) -> Figure:
    """A slot x candidate heatmap of the metric with the slot on that candidate alone (the
    slots decided before it on theirs), the chosen candidate of each slot starred; slots in the
    order they were decided."""
    slots = [s for s in evidence.get("order", []) if s in evidence["slots"]]
    columns = sorted({c for s in slots for c in evidence["slots"][s]})
    z, text = [], []
    for slot in slots:
        scores = evidence["slots"][slot]
        star = choice_label(chosen[slot]) if slot in chosen else None
        z.append([scores.get(c) for c in columns])
        text.append(
            [
                "" if c not in scores else f"{scores[c]:.4g}{' ★' if c == star else ''}"
                for c in columns
            ]
        )
    rows = [f"{i + 1}. {slot}" for i, slot in enumerate(slots)]
    return _slot_heatmap(z, columns, rows, text, name, maximize)


def _slot_heatmap(
    z: list[list[float | None]],
    columns: list[str],
    rows: list[str],
    text: list[list[str]],
    title: str,
    maximize: bool,
    hover: list[list[str]] | None = None,
) -> Figure:
    """A slot x choice heatmap, brighter is better in both directions, choices on top."""
    import plotly.graph_objects as go

    hovers = {"hovertext": hover, "hoverinfo": "text"} if hover is not None else {}
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=columns,
            y=rows,
            text=text,
            texttemplate="%{text}",
            colorscale="Viridis",
            reversescale=not maximize,
            colorbar={"title": {"text": title}},
            xgap=2,
            ygap=2,
            **hovers,
        )
    )
    fig.update_layout(
        yaxis={"autorange": "reversed", "automargin": True, "type": "category"},
        xaxis={"automargin": True, "type": "category", "side": "top"},
    )
    return fig
