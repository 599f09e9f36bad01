"""The plotly figures of the report: optimization history, Pareto front, intermediate values.

plotly is imported when a figure is built, not with the package. The figures about the choices
(importance, which choice won per slot) are in :mod:`autonorm.report._choices`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial

from autonorm._trial_keys import BASELINE
from autonorm.report._format import choice_label, esc
from autonorm.report._summary import number, trial_category, trial_config, trial_reason
from autonorm.report._types import Config
from autonorm.report._winners import better, feasible_complete, has_finite_values, maximizes

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

COLORS = {
    "complete": "#1f77b4",
    "baseline": "#2ca02c",
    "pruned": "#9e9e9e",
    "infeasible": "#d62728",
    "failed": "#000000",
    "best": "#ff7f0e",
}

#: Marker style and legend name of the history's point groups.
_HISTORY_STYLES = {
    "complete": ({"symbol": "circle", "size": 8}, "complete"),
    "baseline": ({"symbol": "diamond", "size": 11}, "baseline"),
    "pruned": ({"symbol": "circle-open", "size": 8}, "pruned (last reported value)"),
    "infeasible": ({"symbol": "x", "size": 9}, "infeasible (last reported value)"),
}


class Figures:
    """Renders plotly figures to HTML fragments, inlining plotly.js into the first one only."""

    def __init__(self) -> None:
        try:
            import plotly.io as pio
        except ImportError:  # pragma: no cover - plotly is a core dependency
            raise ImportError(
                "autonorm's HTML report needs plotly: pip install autonorm (or pip install plotly)"
            ) from None
        self._pio = pio
        self.count = 0

    def render(self, fig: Figure, height: int = 460) -> str:
        """The figure as an HTML fragment of ``height`` pixels."""
        fig.update_layout(height=height, margin={"l": 60, "r": 30, "t": 40, "b": 50})
        fragment = self._pio.to_html(
            fig,
            include_plotlyjs=self.count == 0,
            full_html=False,
            default_width="100%",
            default_height=f"{height}px",
            config={"displaylogo": False, "responsive": True},
        )
        self.count += 1
        return fragment


def hover_config(config: Config, limit: int = 12) -> str:
    """A config as hover lines ``slot: choice``, at most ``limit`` of them."""
    items = [f"{esc(k)}: {esc(choice_label(v))}" for k, v in list(config.items())[:limit]]
    if len(config) > limit:
        items.append(f"... {len(config) - limit} more")
    return "<br>".join(items)


def _last_intermediate(trial: FrozenTrial) -> tuple[int, float] | None:
    finite = [(s, v) for s, v in trial.intermediate_values.items() if math.isfinite(v)]
    return max(finite) if finite else None


# -- optimization history ----------------------------------------------------------------------


def _history_text(trial: FrozenTrial, category: str) -> str:
    """Hover text of a trial: number, category, baseline, reason, config."""
    header = f"trial {trial.number} ({category})"
    if trial.user_attrs.get(BASELINE) is not None:
        header += f"<br>baseline: {esc(trial.user_attrs[BASELINE])}"
    reason = trial_reason(trial)
    if reason:
        header += f"<br>{esc(reason)}"
    return header + "<br>" + hover_config(trial_config(trial))


@dataclass
class _Points:
    """Points of one trace: trial numbers, values (none on the bottom strip), hover texts."""

    x: list[int] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def add(self, x: int, text: str, y: float | None = None) -> None:
        self.x.append(x)
        if y is not None:
            self.y.append(y)
        self.text.append(text)


def _history_points(
    trials: Sequence[FrozenTrial],
) -> tuple[dict[str, _Points], dict[str, _Points]]:
    """(points with a value by group, points without one by category). A pruned or infeasible
    trial without a final value shows its last reported value; one without any, and every
    failed trial, sits at the bottom."""
    groups = {key: _Points() for key in _HISTORY_STYLES}
    bottom = {key: _Points() for key in ("pruned", "infeasible", "failed")}
    for t in trials:
        category = trial_category(t)
        text = _history_text(t, category)
        if category == "complete" and has_finite_values(t):
            key = "baseline" if t.user_attrs.get(BASELINE) is not None else "complete"
            groups[key].add(t.number, text, t.values[0])
            continue
        if category not in bottom:  # complete without a finite value, running, waiting
            continue
        point = t.values[0] if t.values and has_finite_values(t) else None
        if point is None and (last := _last_intermediate(t)) is not None:
            point = last[1]
            text = f"{text}<br>last reported: {point:.6g} at step {last[0]}"
        if point is not None and category != "failed":
            groups[category].add(t.number, text, point)
        else:
            bottom[category].add(t.number, text)
    return groups, bottom


def _best_so_far(trials: Sequence[FrozenTrial], maximize: bool) -> tuple[list[int], list[float]]:
    """Trial numbers and the best feasible value up to each of them."""
    xs: list[int] = []
    ys: list[float] = []
    for t in sorted(feasible_complete(trials), key=lambda t: t.number):
        value = t.values[0]
        xs.append(t.number)
        ys.append(value if not ys or better(value, ys[-1], maximize) else ys[-1])
    return xs, ys


def history_figure(study: optuna.Study, trials: Sequence[FrozenTrial], names: list[str]) -> Figure:
    """Value per trial by category, the best feasible value so far, and the trials without a
    value on a strip at the bottom."""
    import plotly.graph_objects as go

    groups, bottom = _history_points(trials)
    fig = go.Figure()
    for key, data in groups.items():
        if data.x:
            style, name = _HISTORY_STYLES[key]
            fig.add_trace(
                go.Scatter(
                    x=data.x,
                    y=data.y,
                    mode="markers",
                    name=name,
                    hovertext=data.text,
                    hoverinfo="text+y",
                    marker={"color": COLORS[key], **style},
                )
            )
    xs, ys = _best_so_far(trials, maximizes(study))
    if xs:
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"shape": "hv", "color": COLORS["best"]},
                name="best so far",
            )
        )
    for key, data in bottom.items():
        if data.x:
            fig.add_trace(
                go.Scatter(
                    x=data.x,
                    y=[0.04] * len(data.x),
                    yaxis="y2",
                    mode="markers",
                    name=f"{key} (no value)",
                    hovertext=data.text,
                    hoverinfo="text",
                    marker={"color": COLORS[key], "symbol": "x-open", "size": 9},
                )
            )
    fig.update_layout(
        xaxis={"title": {"text": "trial"}},
        yaxis={"title": {"text": names[0]}},
        yaxis2={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


# -- intermediate values -----------------------------------------------------------------------


def intermediate_figure(trials: Sequence[FrozenTrial], name: str) -> Figure | None:
    """The values each trial reported per epoch, one line a trial (None when none reported)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    shown: set[str] = set()
    for t in trials:
        if not t.intermediate_values:
            continue
        category = trial_category(t)
        key = "baseline" if t.user_attrs.get(BASELINE) is not None else category
        steps = sorted(t.intermediate_values)
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[number(t.intermediate_values[s]) for s in steps],
                mode="lines+markers",
                name=key,
                legendgroup=key,
                showlegend=key not in shown,
                line={"color": COLORS.get(key, COLORS["complete"]), "width": 1.5},
                marker={"size": 4},
                opacity=0.45 if key in ("pruned", "infeasible") else 0.9,
                hovertemplate=f"trial {t.number} ({category})<br>step %{{x}}: %{{y:.6g}}<extra></extra>",
            )
        )
        shown.add(key)
    if not shown:
        return None
    fig.update_layout(
        xaxis={"title": {"text": "step (epoch)"}},
        yaxis={"title": {"text": name}},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


# -- Pareto front ------------------------------------------------------------------------------


def _pareto_hover(trial: FrozenTrial, names: list[str]) -> str:
    values = ", ".join(f"{esc(n)}={v:.4g}" for n, v in zip(names, trial.values, strict=True))
    return f"trial {trial.number}<br>{values}<br>{hover_config(trial_config(trial))}"


def _pareto_scatter(
    others: list[FrozenTrial], front: Sequence[FrozenTrial], names: list[str]
) -> Figure:
    """Two objectives: the dominated trials and the front as a step line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, group, color in (
        ("dominated", others, COLORS["pruned"]),
        ("Pareto front", sorted(front, key=lambda t: t.values[0]), COLORS["infeasible"]),
    ):
        if group:
            fig.add_trace(
                go.Scatter(
                    x=[t.values[0] for t in group],
                    y=[t.values[1] for t in group],
                    mode="markers+lines" if label == "Pareto front" else "markers",
                    line={"shape": "hv", "dash": "dot"},
                    name=label,
                    hovertext=[_pareto_hover(t, names) for t in group],
                    hoverinfo="text",
                    marker={"color": color, "size": 9},
                )
            )
    fig.update_layout(
        xaxis={"title": {"text": names[0]}},
        yaxis={"title": {"text": names[1]}},
    )
    return fig


def _pareto_matrix(
    others: list[FrozenTrial], front: Sequence[FrozenTrial], names: list[str]
) -> Figure:
    """Three or more objectives: a scatter matrix, the front in red."""
    import plotly.graph_objects as go

    on_front = {t.number for t in front}
    ordered = others + list(front)
    return go.Figure(
        go.Splom(
            dimensions=[
                {"label": n, "values": [t.values[i] for t in ordered]} for i, n in enumerate(names)
            ],
            hovertext=[_pareto_hover(t, names) for t in ordered],
            hoverinfo="text",
            marker={
                "color": [
                    COLORS["infeasible"] if t.number in on_front else COLORS["pruned"]
                    for t in ordered
                ],
                "size": 7,
            },
            diagonal={"visible": False},
        )
    )


def pareto_figure(
    trials: Sequence[FrozenTrial], front: Sequence[FrozenTrial], names: list[str]
) -> Figure | None:
    """The feasible complete trials in objective space, the front marked (None when there is
    no feasible complete trial)."""
    feasible = feasible_complete(trials)
    if not feasible:
        return None
    on_front = {t.number for t in front}
    others = [t for t in feasible if t.number not in on_front]
    if len(names) == 2:
        return _pareto_scatter(others, front, names)
    return _pareto_matrix(others, front, names)
