"""``autonorm.report``: what a search found, for people and for programs.

Four plain functions over an ``optuna.Study`` written by :func:`autonorm.search` (they also work
on any study whose trials carry autonorm's user attributes, or none of them):

* :func:`best_feasible_trial` and :func:`pareto_trials` pick the winners, skipping the trials
  that broke the budget (user attribute ``feasible=False``).
* :func:`write_summary` writes ``summary.json``, the machine-readable record of the search.
* :func:`write_report` writes ``report.html``, one self-contained page of tables and plotly
  figures that opens offline.
* :func:`attach_dashboard_artifacts` uploads the bundle's files as study artifacts and writes a
  study note, so that ``optuna-dashboard STORAGE --artifact-dir OUT_DIR/artifacts`` shows them.

The trial attributes read here are the ones the search writes: ``config`` (slot name -> choice
value, a label string or a dict), ``feasible`` (False when over the budget), ``infeasible_reason``,
``prune_reason``, ``epochs`` (epochs trained) and ``baseline`` (the label of a warm-start trial).
The study attribute ``autonorm`` holds the search settings (``monitor``, ``mode``,
``objectives``, ``budget``, ``model_class``, ``slots``, ``max_epochs``); each may be missing.
"""

from __future__ import annotations

import copy
import datetime
import html
import json
import logging
import math
import mimetypes
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autonorm._io import atomic_write

log = logging.getLogger(__name__)

#: File name of the summary inside a bundle folder.
SUMMARY_FILE = "summary.json"
#: Folder of the dashboard artifact store inside a bundle folder.
ARTIFACT_DIR = "artifacts"
#: First line of the study note autonorm writes; a note without it was written by a person and
#: is left alone.
NOTE_HEADING = "## autonorm summary"

_STATES = ("complete", "pruned", "infeasible", "failed", "running", "waiting")
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_TEXT_SUFFIXES = {".yaml", ".yml", ".txt", ".md", ".log", ".toml", ".cfg", ".ini"}


# -- picking the winners ---------------------------------------------------------------------


def _is_feasible(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get("feasible", True) is not False


def _has_finite_values(trial: FrozenTrial) -> bool:
    values = trial.values
    return bool(values) and all(v is not None and math.isfinite(v) for v in values)


def _feasible_complete(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials within the budget whose objective values are all finite."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and _is_feasible(t) and _has_finite_values(t)
    ]


def best_feasible_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial of a single-objective study that met the budget.

    A trial counts when its ``feasible`` user attribute is not False and its value is finite;
    "best" follows the study's direction. Ties go to the earliest trial.

    Args:
        study: a single-objective study.

    Returns:
        The trial, or None when no trial qualifies (no trials, or all of them pruned, failed or
        over the budget).

    Raises:
        ValueError: ``study`` has more than one objective (use :func:`pareto_trials`).

    Example::

        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study(direction="maximize")
        >>> study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"feasible": False}))
        >>> study.add_trial(optuna.trial.create_trial(value=0.7))
        >>> best_feasible_trial(study).value
        0.7
    """
    if len(study.directions) != 1:
        raise ValueError(
            f"best_feasible_trial needs a single-objective study, study {study.study_name!r} has "
            f"{len(study.directions)} objectives; use pareto_trials()"
        )
    candidates = _feasible_complete(study.get_trials(deepcopy=False))
    if not candidates:
        return None
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    best = min(candidates, key=lambda t: (sign * t.values[0], t.number))
    return copy.deepcopy(best)  # the caller may keep or change it


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b`` (values multiplied by ``signs`` are minimized)."""
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b, strict=True)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of the trials that met the budget, ordered by trial number.

    This is ``study.best_trials`` restricted to feasible trials, computed among the feasible
    COMPLETE trials only, so that a trial over the budget never hides a feasible one it would
    dominate. On a single-objective study it returns the best feasible trial and its ties.

    Args:
        study: a study with one or more objectives.

    Returns:
        The non-dominated feasible COMPLETE trials with finite values (empty when none).
    """
    candidates = _feasible_complete(study.get_trials(deepcopy=False))
    signs = [-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in study.directions]
    return [
        copy.deepcopy(t)
        for t in candidates
        if not any(_dominates(o.values, t.values, signs) for o in candidates if o is not t)
    ]


# -- shared helpers --------------------------------------------------------------------------


def _category(trial: FrozenTrial) -> str:
    """One of :data:`_STATES`. A finished trial over the budget is "infeasible", whatever its
    Optuna state (the search prunes such trials), as in the live progress display."""
    if trial.state == TrialState.RUNNING:
        return "running"
    if trial.state == TrialState.WAITING:
        return "waiting"
    if not _is_feasible(trial):
        return "infeasible"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, "failed")


def _counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counter = Counter(_category(t) for t in trials)
    return {"total": len(trials), **{state: counter.get(state, 0) for state in _STATES}}


def _number(value: Any) -> float | None:
    """A float for JSON, None for missing and non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None and unknown types by their ``str``."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _choice_label(value: Any) -> str:
    """The display label of a stored choice: a label string as it is, a dict as
    ``name(key=value, ...)`` (or its ``label`` entry when it has one)."""
    if isinstance(value, dict):
        if isinstance(value.get("label"), str):
            return value["label"]
        name = str(value.get("name", "?"))
        options = ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("name", "label"))
        return f"{name}({options})" if options else name
    return str(value)


def _config(trial: FrozenTrial) -> dict[str, Any]:
    """Slot name -> stored choice value (``config`` attribute; the params when it is missing)."""
    config = trial.user_attrs.get("config")
    if isinstance(config, dict):
        return dict(config)
    return dict(trial.params)


def _info(study: optuna.Study) -> dict[str, Any]:
    info = study.user_attrs.get("autonorm")
    return dict(info) if isinstance(info, dict) else {}


def _objective_names(study: optuna.Study, info: dict[str, Any]) -> list[str]:
    names = info.get("objectives")
    n = len(study.directions)
    if isinstance(names, list) and len(names) == n:
        return [str(name) for name in names]
    if n == 1:
        return [str(info.get("monitor") or "value")]
    return [f"objective {i}" for i in range(n)]


def _epochs_run(trial: FrozenTrial) -> int:
    try:
        return max(int(trial.user_attrs.get("epochs", 0)), 0)
    except (TypeError, ValueError):
        return 0


def _epochs(trials: Sequence[FrozenTrial], max_epochs: Any) -> dict[str, int | None]:
    """Epochs trained in all, and epochs pruning and the budget saved against training every
    pruned or infeasible trial for ``max_epochs``."""
    run = sum(_epochs_run(t) for t in trials)
    try:
        limit = int(max_epochs) if max_epochs is not None else None
    except (TypeError, ValueError):
        limit = None
    saved = None
    if limit is not None:
        stopped = [t for t in trials if _category(t) in ("pruned", "infeasible")]
        saved = sum(max(limit - _epochs_run(t), 0) for t in stopped)
    return {"run": run, "saved_by_pruning": saved, "max_epochs": limit}


def _reasons(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Infeasible trials by reason, most frequent first."""
    counter = Counter(
        str(t.user_attrs.get("infeasible_reason") or t.user_attrs.get("prune_reason") or "unknown")
        for t in trials
        if _category(t) == "infeasible"
    )
    return dict(counter.most_common())


def _baselines(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    out = []
    for t in trials:
        label = t.user_attrs.get("baseline")
        if label is None:
            continue
        values = [_number(v) for v in t.values] if t.values else None
        out.append(
            {
                "label": str(label),
                "trial": t.number,
                "state": _category(t),
                "value": values[0] if values else None,
                "values": values,
            }
        )
    return out


def _trial_seconds(trials: Sequence[FrozenTrial]) -> float:
    return sum(t.duration.total_seconds() for t in trials if t.duration is not None)


# -- summary.json ----------------------------------------------------------------------------


def _summary(study: optuna.Study, *, elapsed: float | None = None) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    info = _info(study)
    multi = len(study.directions) > 1
    best = None if multi else best_feasible_trial(study)
    pareto = None
    if multi:
        pareto = [
            {
                "trial": t.number,
                "values": [_number(v) for v in t.values],
                "config": _config(t),
            }
            for t in pareto_trials(study)
        ]
    summary = {
        "study_name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "monitor": info.get("monitor"),
        "mode": info.get("mode"),
        "objectives": _objective_names(study, info),
        "model_class": info.get("model_class"),
        "slots": info.get("slots"),
        "best_value": _number(best.values[0]) if best is not None else None,
        "best_trial": best.number if best is not None else None,
        "best_config": _config(best) if best is not None else None,
        "pareto": pareto,
        "trials": _counts(trials),
        "infeasible_reasons": _reasons(trials),
        "baselines": _baselines(trials),
        "epochs": _epochs(trials, info.get("max_epochs")),
        "budget": info.get("budget"),
        "elapsed": _number(elapsed),
        "trial_seconds": _number(_trial_seconds(trials)),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return _json_safe(summary)


def write_summary(study: optuna.Study, out_dir: Path, *, elapsed: float | None = None) -> dict:
    """Write ``out_dir/summary.json`` (atomically) and return its content.

    Keys: ``study_name``, ``directions``, ``monitor``, ``mode``, ``objectives``,
    ``model_class``, ``slots`` (from the study's ``autonorm`` attribute, None when missing);
    ``best_value``, ``best_trial``, ``best_config`` (single objective; None without a feasible
    trial); ``pareto`` (multi-objective: ``[{trial, values, config}]``, else None); ``trials``
    (counts: ``total``, ``complete``, ``pruned``, ``infeasible``, ``failed``, ``running``,
    ``waiting``; a trial over the budget counts as infeasible, not as pruned);
    ``infeasible_reasons`` (reason -> count); ``baselines`` (``[{label, trial, state, value,
    values}]``); ``epochs`` (``run``: epochs trained in all, ``saved_by_pruning``:
    ``max_epochs`` times the pruned and infeasible trials minus the epochs they trained,
    ``max_epochs``); ``budget``; ``elapsed`` (seconds, as given); ``trial_seconds`` (sum of the
    trials' durations); ``written_at`` (UTC, ISO 8601). Non-finite numbers are written as null.

    Args:
        study: the study.
        out_dir: the bundle folder (created when missing).
        elapsed: wall-clock seconds of the search run, if known.

    Returns:
        The summary, as written.
    """
    summary = _summary(study, elapsed=elapsed)
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(out_dir) / SUMMARY_FILE, text)
    return summary


# -- report.html -----------------------------------------------------------------------------


_COLORS = {
    "complete": "#1f77b4",
    "baseline": "#2ca02c",
    "pruned": "#9e9e9e",
    "infeasible": "#d62728",
    "failed": "#000000",
    "best": "#ff7f0e",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f3f3f3; padding: 0 0.2em; }
.note { background: #fff8e1; border-left: 4px solid #ffb300; padding: 0.5em 1em; }
.muted { color: #666; font-size: 0.9em; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; every cell is escaped, numbers are right-aligned."""
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            css = ' class="num"' if numeric else ""
            cells.append(f"<td{css}>{_esc(_fmt(cell))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _hover_config(config: dict[str, Any], limit: int = 12) -> str:
    items = [f"{_esc(k)}: {_esc(_choice_label(v))}" for k, v in list(config.items())[:limit]]
    if len(config) > limit:
        items.append(f"... {len(config) - limit} more")
    return "<br>".join(items)


def _last_intermediate(trial: FrozenTrial) -> tuple[int, float] | None:
    finite = [(s, v) for s, v in trial.intermediate_values.items() if math.isfinite(v)]
    return max(finite) if finite else None


class _Figures:
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

    def render(self, fig: Any, height: int = 460) -> str:
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


def _history_figure(study: optuna.Study, trials: Sequence[FrozenTrial], names: list[str]) -> Any:
    import plotly.graph_objects as go

    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    groups: dict[str, dict[str, list[Any]]] = {
        key: {"x": [], "y": [], "text": []}
        for key in ("complete", "baseline", "pruned", "infeasible")
    }
    bottom: dict[str, dict[str, list[Any]]] = {
        key: {"x": [], "text": []} for key in ("pruned", "infeasible", "failed")
    }
    for t in trials:
        category = _category(t)
        header = f"trial {t.number} ({category})"
        if t.user_attrs.get("baseline") is not None:
            header += f"<br>baseline: {_esc(t.user_attrs['baseline'])}"
        reason = t.user_attrs.get("infeasible_reason") or t.user_attrs.get("prune_reason")
        if reason:
            header += f"<br>{_esc(reason)}"
        text = header + "<br>" + _hover_config(_config(t))
        if category == "complete" and _has_finite_values(t):
            key = "baseline" if t.user_attrs.get("baseline") is not None else "complete"
            groups[key]["x"].append(t.number)
            groups[key]["y"].append(t.values[0])
            groups[key]["text"].append(text)
            continue
        if category not in ("pruned", "infeasible", "failed"):
            continue
        point = None
        if t.values and _has_finite_values(t):
            point = t.values[0]
        elif (last := _last_intermediate(t)) is not None:
            point = last[1]
            text = f"{text}<br>last reported: {point:.6g} at step {last[0]}"
        if point is not None and category != "failed":
            groups[category]["x"].append(t.number)
            groups[category]["y"].append(point)
            groups[category]["text"].append(text)
        else:
            bottom[category]["x"].append(t.number)
            bottom[category]["text"].append(text)

    fig = go.Figure()
    styles = {
        "complete": {"symbol": "circle", "size": 8},
        "baseline": {"symbol": "diamond", "size": 11},
        "pruned": {"symbol": "circle-open", "size": 8},
        "infeasible": {"symbol": "x", "size": 9},
    }
    names_by_key = {
        "complete": "complete",
        "baseline": "baseline",
        "pruned": "pruned (last reported value)",
        "infeasible": "infeasible (last reported value)",
    }
    for key, data in groups.items():
        if data["x"]:
            fig.add_trace(
                go.Scatter(
                    x=data["x"],
                    y=data["y"],
                    mode="markers",
                    name=names_by_key[key],
                    hovertext=data["text"],
                    hoverinfo="text+y",
                    marker={"color": _COLORS[key], **styles[key]},
                )
            )
    ranked = sorted(_feasible_complete(trials), key=lambda t: t.number)
    if ranked:
        xs, ys, best = [], [], None
        for t in ranked:
            value = t.values[0]
            if best is None or (value > best if maximize else value < best):
                best = value
            xs.append(t.number)
            ys.append(best)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"shape": "hv", "color": _COLORS["best"]},
                name="best so far",
            )
        )
    for key, data in bottom.items():
        if data["x"]:
            fig.add_trace(
                go.Scatter(
                    x=data["x"],
                    y=[0.04] * len(data["x"]),
                    yaxis="y2",
                    mode="markers",
                    name=f"{key} (no value)",
                    hovertext=data["text"],
                    hoverinfo="text",
                    marker={"color": _COLORS[key], "symbol": "x-open", "size": 9},
                )
            )
    fig.update_layout(
        xaxis={"title": {"text": "trial"}},
        yaxis={"title": {"text": names[0]}},
        yaxis2={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


def _importances(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, float]:
    """Parameter importances for the first objective, over the feasible COMPLETE trials only
    (copied into an in-memory study, so that trials over the budget do not count)."""
    feasible = _feasible_complete(trials)
    if len(feasible) < 2:
        raise ValueError(
            f"needs at least 2 feasible complete trials, the study has {len(feasible)}"
        )
    common = set(feasible[0].params)
    for t in feasible[1:]:
        common &= set(t.params)
    if not common:
        raise ValueError("the feasible trials share no parameter")
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


def _importance_figure(importances: dict[str, float], name: str) -> Any:
    import plotly.graph_objects as go

    ordered = sorted(importances.items(), key=lambda kv: kv[1])
    fig = go.Figure(
        go.Bar(
            x=[v for _, v in ordered],
            y=[k for k, _ in ordered],
            orientation="h",
            marker={"color": _COLORS["complete"]},
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis={"title": {"text": f"importance for {name} (sums to 1)"}},
        yaxis={"automargin": True},
    )
    return fig


def _slot_order(info: dict[str, Any], trials: Sequence[FrozenTrial]) -> list[str]:
    slots: list[str] = []
    for slot in info.get("slots") or []:
        if isinstance(slot, dict) and slot.get("name") is not None:
            slots.append(str(slot["name"]))
    for t in trials:
        for name in _config(t):
            if name not in slots:
                slots.append(name)
    return slots


def _choice_map(
    study: optuna.Study, trials: Sequence[FrozenTrial], slots: list[str]
) -> tuple[list[str], list[list[float | None]], list[list[str]], list[list[str]]]:
    """(choices, best value, cell text, hover text) per slot and choice: the best first-objective
    value among the feasible COMPLETE trials that gave the slot that choice."""
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    feasible = {t.number for t in _feasible_complete(trials)}
    tried: Counter[tuple[str, str]] = Counter()
    best: dict[tuple[str, str], tuple[float, int]] = {}
    choices: set[str] = set()
    for t in trials:
        if t.state not in _FINISHED:
            continue
        for slot, value in _config(t).items():
            key = (slot, _choice_label(value))
            choices.add(key[1])
            tried[key] += 1
            if t.number in feasible:
                v = t.values[0]
                old = best.get(key)
                if old is None or (v > old[0] if maximize else v < old[0]):
                    best[key] = (v, t.number)
    columns = sorted(choices)
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    hover: list[list[str]] = []
    for slot in slots:
        row_best = [best.get((slot, c)) for c in columns]
        values = [b[0] for b in row_best if b is not None]
        winner = (max(values) if maximize else min(values)) if values else None
        z_row: list[float | None] = []
        text_row: list[str] = []
        hover_row: list[str] = []
        for choice, cell in zip(columns, row_best, strict=True):
            n = tried.get((slot, choice), 0)
            if cell is None:
                z_row.append(None)
                text_row.append("" if n == 0 else "x")
                status = "not tried" if n == 0 else f"tried {n}x, no feasible result"
                hover_row.append(f"{_esc(slot)}<br>{_esc(choice)}<br>{status}")
                continue
            z_row.append(cell[0])
            star = " ★" if cell[0] == winner else ""
            text_row.append(f"{cell[0]:.4g}{star}")
            hover_row.append(
                f"{_esc(slot)}<br>{_esc(choice)}<br>best {cell[0]:.6g} (trial {cell[1]})"
                f"<br>tried in {n} finished trials"
            )
        z.append(z_row)
        text.append(text_row)
        hover.append(hover_row)
    return columns, z, text, hover


def _choice_map_figure(
    study: optuna.Study, trials: Sequence[FrozenTrial], slots: list[str], name: str
) -> Any | None:
    import plotly.graph_objects as go

    columns, z, text, hover = _choice_map(study, trials, slots)
    if not columns or not slots:
        return None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=columns,
            y=slots,
            text=text,
            texttemplate="%{text}",
            hovertext=hover,
            hoverinfo="text",
            colorscale="Viridis",
            reversescale=not maximize,  # brighter is better in both directions
            colorbar={"title": {"text": f"best {name}"}},
            xgap=2,
            ygap=2,
        )
    )
    fig.update_layout(
        yaxis={"autorange": "reversed", "automargin": True, "type": "category"},
        xaxis={"automargin": True, "type": "category", "side": "top"},
    )
    return fig


def _intermediate_figure(trials: Sequence[FrozenTrial], name: str) -> Any | None:
    import plotly.graph_objects as go

    fig = go.Figure()
    shown: set[str] = set()
    for t in trials:
        if not t.intermediate_values:
            continue
        category = _category(t)
        key = "baseline" if t.user_attrs.get("baseline") is not None else category
        color = _COLORS.get(key, _COLORS["complete"])
        steps = sorted(t.intermediate_values)
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[_number(t.intermediate_values[s]) for s in steps],
                mode="lines+markers",
                name=key,
                legendgroup=key,
                showlegend=key not in shown,
                line={"color": color, "width": 1.5},
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


def _pareto_figure(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    front: Sequence[FrozenTrial],
    names: list[str],
) -> Any | None:
    import plotly.graph_objects as go

    feasible = _feasible_complete(trials)
    if not feasible:
        return None
    on_front = {t.number for t in front}
    others = [t for t in feasible if t.number not in on_front]

    def hover(t: FrozenTrial) -> str:
        values = ", ".join(f"{_esc(n)}={v:.4g}" for n, v in zip(names, t.values, strict=True))
        return f"trial {t.number}<br>{values}<br>{_hover_config(_config(t))}"

    if len(names) == 2:
        fig = go.Figure()
        for label, group, color in (
            ("dominated", others, _COLORS["pruned"]),
            ("Pareto front", sorted(front, key=lambda t: t.values[0]), _COLORS["infeasible"]),
        ):
            if group:
                fig.add_trace(
                    go.Scatter(
                        x=[t.values[0] for t in group],
                        y=[t.values[1] for t in group],
                        mode="markers+lines" if label == "Pareto front" else "markers",
                        line={"shape": "hv", "dash": "dot"},
                        name=label,
                        hovertext=[hover(t) for t in group],
                        hoverinfo="text",
                        marker={"color": color, "size": 9},
                    )
                )
        fig.update_layout(
            xaxis={"title": {"text": names[0]}},
            yaxis={"title": {"text": names[1]}},
        )
        return fig
    ordered = others + list(front)
    fig = go.Figure(
        go.Splom(
            dimensions=[
                {"label": n, "values": [t.values[i] for t in ordered]} for i, n in enumerate(names)
            ],
            hovertext=[hover(t) for t in ordered],
            hoverinfo="text",
            marker={
                "color": [
                    _COLORS["infeasible"] if t.number in on_front else _COLORS["pruned"]
                    for t in ordered
                ],
                "size": 7,
            },
            diagonal={"visible": False},
        )
    )
    return fig


def _budget_value(key: str, value: Any) -> str:
    """A budget limit for people: memory in bytes as KiB/MiB/GiB, anything else as it is."""
    if "memory" not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.4g} {unit}"
        size /= 1024
    return f"{size:.4g} TiB"


def _summary_section(study: optuna.Study, summary: dict[str, Any]) -> str:
    counts = summary["trials"]
    rows: list[tuple[str, Any]] = [("study", summary["study_name"])]
    if summary.get("model_class"):
        rows.append(("model", summary["model_class"]))
    if summary.get("monitor"):
        rows.append(("metric", f"{summary['monitor']} ({summary.get('mode') or '?'})"))
    rows.append(("objectives", ", ".join(summary["objectives"])))
    rows.append(("directions", ", ".join(summary["directions"])))
    if summary.get("slots"):
        rows.append(("slots", len(summary["slots"])))
    if summary["pareto"] is None:
        best = summary["best_value"]
        rows.append(
            (
                "best value",
                f"{best:.6g} (trial {summary['best_trial']})" if best is not None else "-",
            )
        )
    else:
        rows.append(("Pareto front", f"{len(summary['pareto'])} trials"))
    rows.append(("trials", ", ".join(f"{counts[s]} {s}" for s in _STATES if counts[s])))
    budget = summary.get("budget")
    if isinstance(budget, dict) and any(v is not None for v in budget.values()):
        limits = ", ".join(f"{k}={_budget_value(k, v)}" for k, v in budget.items() if v is not None)
        rows.append(("budget", f"{limits}; rejected {counts['infeasible']} trials"))
    else:
        rows.append(("budget", f"none; {counts['infeasible']} trials marked infeasible"))
    epochs = summary["epochs"]
    if epochs["run"] or epochs["saved_by_pruning"]:
        text = f"{epochs['run']} trained"
        if epochs["saved_by_pruning"] is not None:
            text += f", {epochs['saved_by_pruning']} saved by pruning and the budget"
        if epochs["max_epochs"] is not None:
            text += f" (max_epochs={epochs['max_epochs']})"
        rows.append(("epochs", text))
    rows.append(("trial time", f"{summary['trial_seconds'] or 0:.1f} s (sum over trials)"))
    parts = ["<h2>Summary</h2>", _table(None, rows)]
    if summary["infeasible_reasons"]:
        parts.append("<h3>Why trials were rejected</h3>")
        parts.append(_table(("reason", "trials"), summary["infeasible_reasons"].items()))
    if summary["baselines"]:
        parts.append("<h3>Baselines (warm start)</h3>")
        parts.append(
            _table(
                ("baseline", "trial", "state", "value"),
                ((b["label"], b["trial"], b["state"], b["value"]) for b in summary["baselines"]),
            )
        )
    return "\n".join(parts)


def _slot_details(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        str(s["name"]): s for s in info.get("slots") or [] if isinstance(s, dict) and "name" in s
    }


def _config_section(summary: dict[str, Any], info: dict[str, Any]) -> str:
    details = _slot_details(info)

    def rows(config: dict[str, Any]) -> list[tuple[Any, ...]]:
        out = []
        for slot, value in config.items():
            d = details.get(slot, {})
            out.append(
                (
                    slot,
                    d.get("kind", ""),
                    d.get("num_features", ""),
                    d.get("layout", ""),
                    _choice_label(value),
                )
            )
        return out

    header = ("slot", "kind", "features", "layout", "choice")
    if summary["pareto"] is None:
        if summary["best_config"] is None:
            return ""
        return f"<h2>Best config (trial {_esc(summary['best_trial'])})</h2>" + _table(
            header, rows(summary["best_config"])
        )
    if not summary["pareto"]:
        return ""
    names = summary["objectives"]
    parts = ["<h2>Pareto front</h2>"]
    parts.append(
        _table(
            ("trial", *names),
            ((p["trial"], *p["values"]) for p in summary["pareto"]),
        )
    )
    for p in summary["pareto"]:
        parts.append(f"<details><summary>config of trial {_esc(p['trial'])}</summary>")
        parts.append(_table(header, rows(p["config"])))
        parts.append("</details>")
    return "\n".join(parts)


def _status_note(summary: dict[str, Any]) -> str:
    counts = summary["trials"]
    if counts["total"] == 0:
        return _note("The study holds no trials yet: nothing to report.")
    has_result = summary["best_value"] is not None or bool(summary["pareto"])
    if has_result:
        return ""
    if counts["complete"] == 0 and counts["infeasible"] == counts["total"]:
        return _note(
            f"All {counts['total']} trials were over the budget: no config met it. Loosen the "
            "budget or narrow the search space."
        )
    stopped = ", ".join(f"{counts[s]} {s}" for s in _STATES if counts[s])
    return _note(f"No trial completed within the budget ({stopped}): no best config.")


def _render_report(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    info = _info(study)
    summary = _summary(study)
    names = _objective_names(study, info)
    figures = _Figures()
    body: list[str] = [
        f"<h1>autonorm report: {_esc(study.study_name)}</h1>",
        f'<p class="muted">written {_esc(summary["written_at"])} from {len(trials)} trials; '
        "every figure is interactive (hover, zoom, click the legend).</p>",
        _status_note(summary),
        _summary_section(study, summary),
        _config_section(summary, info),
    ]
    finished = [t for t in trials if t.state in _FINISHED]
    multi = len(study.directions) > 1
    body.append("<h2>Optimization history</h2>")
    if finished:
        caption = (
            f"{_esc(names[0])} per trial, with the best feasible value so far. Pruned and "
            "infeasible trials show their last reported value; those without one sit at the bottom."
        )
        body.append(f'<p class="muted">{caption}</p>')
        body.append(figures.render(_history_figure(study, trials, names)))
    else:
        body.append(_note("No finished trial yet."))

    if multi:
        body.append("<h2>Pareto front</h2>")
        front = pareto_trials(study)
        fig = _pareto_figure(study, trials, front, names)
        if fig is None:
            body.append(_note("No feasible complete trial: no Pareto front."))
        else:
            body.append(
                f'<p class="muted">Feasible complete trials; {len(front)} on the front (red).</p>'
            )
            body.append(figures.render(fig, height=520))

    body.append("<h2>Choice importance</h2>")
    try:
        importances = _importances(study, trials)
        if not importances:
            raise ValueError("no parameter varied")
    except Exception as err:  # importance is a nicety: any failure becomes a note
        log.debug("parameter importance failed: %s", err, exc_info=True)
        body.append(_note(f"No importance estimate: {err}."))
    else:
        body.append(
            f'<p class="muted">How much each searched parameter (a slot, or a group of tied slots) '
            f"explains {_esc(names[0])} across the feasible complete trials "
            "(optuna.importance.get_param_importances).</p>"
        )
        body.append(
            figures.render(
                _importance_figure(importances, names[0]),
                height=max(300, 26 * len(importances) + 120),
            )
        )

    body.append("<h2>Which choice won, per slot</h2>")
    slots = _slot_order(info, trials)
    fig = _choice_map_figure(study, trials, slots, names[0]) if finished else None
    if fig is None:
        body.append(_note("No finished trial with a config yet."))
    else:
        body.append(
            f'<p class="muted">Cell: the best {_esc(names[0])} among the feasible complete trials '
            "that gave the slot this choice (brighter is better; ★ marks the slot's winner; x: "
            "tried, but never in a feasible complete trial; empty: never tried).</p>"
        )
        body.append(figures.render(fig, height=max(320, 30 * len(slots) + 160)))

    body.append("<h2>Intermediate values</h2>")
    fig = _intermediate_figure(trials, names[0])
    if fig is None:
        body.append(_note("No trial reported intermediate values."))
    else:
        body.append(
            f'<p class="muted">{_esc(names[0])} reported after each epoch, one line per trial.</p>'
        )
        body.append(figures.render(fig))

    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>autonorm report: {_esc(study.study_name)}</title>\n<style>{_CSS}</style>\n"
        "</head>\n<body>\n" + "\n".join(part for part in body if part) + "\n</body>\n</html>\n"
    )


def write_report(study: optuna.Study, path: Path) -> Path:
    """Write a self-contained HTML report of the study (atomically) and return its path.

    The page holds: the summary table (best value, trials by state, the budget and how many
    trials it rejected, with the reasons, epochs trained and saved, baselines); the best config
    per slot (or the Pareto front's configs); and plotly figures: the optimization history
    (value per trial, best-so-far line, pruned and infeasible trials marked), the Pareto front
    (multi-objective), the importance of each searched parameter, a slot x choice heatmap whose
    cells hold the best value reached by the feasible complete trials with that choice (the
    winner of each slot starred), and the intermediate values of each trial. plotly.js is
    inlined once, so the file opens offline. A study without trials, or without a single
    feasible one, still gets a page that says so.

    Args:
        study: the study.
        path: the HTML file to write (its folder is created when missing).

    Returns:
        ``path``.
    """
    path = Path(path)
    atomic_write(path, _render_report(study))
    log.info("wrote %s", path)
    return path


# -- optuna-dashboard ------------------------------------------------------------------------


def _md(value: Any) -> str:
    """Inline code for a markdown table cell."""
    text = str(value).replace("`", "'").replace("|", "\\|").replace("\n", " ")
    return f"`{text}`"


def _note_markdown(study: optuna.Study, out_dir: Path, files: Sequence[Path]) -> str:
    summary = _summary(study)
    counts = summary["trials"]
    lines = [NOTE_HEADING, ""]
    what = []
    if summary.get("model_class"):
        what.append(f"model {_md(summary['model_class'])}")
    if summary.get("monitor"):
        what.append(f"metric {_md(summary['monitor'])} ({summary.get('mode') or '?'})")
    if what:
        sentence = ", ".join(what)
        lines += [sentence[0].upper() + sentence[1:] + ".", ""]
    if summary["pareto"] is None:
        if summary["best_value"] is None:
            lines += ["**No trial met the budget**: no best config.", ""]
        else:
            lines += [
                f"**Best value:** {summary['best_value']:.6g} (trial {summary['best_trial']})",
                "",
                "| slot | choice |",
                "| --- | --- |",
            ]
            lines += [
                f"| {_md(k)} | {_md(_choice_label(v))} |" for k, v in summary["best_config"].items()
            ]
            lines.append("")
    else:
        names = summary["objectives"]
        lines += [f"**Pareto front:** {len(summary['pareto'])} trials", ""]
        if summary["pareto"]:
            lines += ["| trial | " + " | ".join(_md(n) for n in names) + " |"]
            lines += ["| --- " * (len(names) + 1) + "|"]
            for p in summary["pareto"]:
                lines.append(f"| {p['trial']} | " + " | ".join(_fmt(v) for v in p["values"]) + " |")
            lines.append("")
    lines.append(
        "**Trials:** "
        + ", ".join(f"{counts[s]} {s}" for s in _STATES if counts[s] or s == "complete")
    )
    if counts["infeasible"]:
        lines[-1] += " (infeasible: over the budget)"
    lines.append("")
    if files:
        lines.append("**Artifacts:** " + ", ".join(_md(Path(f).name) for f in files))
        lines.append("")
    lines.append(
        f"Written by autonorm from bundle {_md(out_dir)}; `report.html` there has the plots."
    )
    return "\n".join(lines) + "\n"


def _same_content(store: Any, artifact_id: str, path: Path) -> bool:
    try:
        with store.open_reader(artifact_id) as reader:
            return reader.read() == path.read_bytes()
    except Exception:  # missing from this store, unreadable: treat as different
        return False


def attach_dashboard_artifacts(study: optuna.Study, out_dir: Path, files: list[Path]) -> None:
    """Upload ``files`` as study artifacts and write a study note for optuna-dashboard.

    The artifact store is the folder ``out_dir/artifacts`` (always created, even without
    files). A file whose name and bytes match an artifact already attached to the study is not
    uploaded again, so rebuilding a bundle does not pile up copies. The note (markdown: best
    value, best config table, trial counts) replaces an earlier autonorm note but never a note
    a person wrote in the dashboard. Open both with::

        optuna-dashboard sqlite:///OUT_DIR/study.db --artifact-dir OUT_DIR/artifacts

    Args:
        study: the study (its storage records the artifacts and the note).
        out_dir: the bundle folder.
        files: files to attach, e.g. ``best_config.yaml``.

    Raises:
        FileNotFoundError: a file of ``files`` does not exist (nothing is uploaded then).
    """
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"cannot attach missing files to study {study.study_name!r}: {missing}"
        )
    artifact_dir = Path(out_dir) / ARTIFACT_DIR
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_dir))
    existing = get_all_artifact_meta(study)
    for path in paths:
        if any(
            meta.filename == path.name and _same_content(store, meta.artifact_id, path)
            for meta in existing
        ):
            log.debug("artifact %s is already attached to study %r", path.name, study.study_name)
            continue
        mimetype = None
        if mimetypes.guess_type(path.name)[0] is None and path.suffix.lower() in _TEXT_SUFFIXES:
            mimetype = "text/plain"  # shown in the browser rather than downloaded
        artifact_id = upload_artifact(
            study_or_trial=study, file_path=str(path), artifact_store=store, mimetype=mimetype
        )
        log.info("attached %s to study %r as artifact %s", path.name, study.study_name, artifact_id)

    try:
        from optuna_dashboard import get_note, save_note
    except ImportError:
        log.warning(
            "optuna-dashboard is not installed: no study note written "
            "(pip install autonorm[dashboard])"
        )
        return
    current = get_note(study)
    if current.strip() and not current.startswith(NOTE_HEADING):
        log.info("study %r has a note written by hand: left as it is", study.study_name)
        return
    save_note(study, _note_markdown(study, Path(out_dir), paths))
