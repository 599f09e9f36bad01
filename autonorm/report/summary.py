"""``summary.json``: the machine-readable record of a search, and the trial-reading helpers the
page and the dashboard note share (trial-state categories, a trial's config, the study's
settings)."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autonorm._io import atomic_write
from autonorm._trial_keys import (
    BASELINE,
    CONFIG,
    EPOCHS,
    INFEASIBLE_REASON,
    PRUNE_REASON,
    STUDY_INFO,
)
from autonorm.report.winners import best_feasible_trial, is_feasible, pareto_trials

#: File name of the summary inside a bundle folder.
SUMMARY_FILE = "summary.json"

#: The trial-state categories, in display order (see :func:`trial_category`).
STATES = ("complete", "pruned", "infeasible", "failed", "running", "waiting")
#: Optuna states of a trial that has ended.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def trial_category(trial: FrozenTrial) -> str:
    """The category of a trial, one of :data:`STATES`.

    A running or waiting trial is "running" or "waiting"; a finished trial over the budget
    (``feasible=False``) is "infeasible", whatever its Optuna state (the search prunes such
    trials); otherwise COMPLETE is "complete", PRUNED is "pruned" and anything else "failed".

    Example::

        >>> import optuna
        >>> trial = optuna.trial.create_trial(value=1.0, user_attrs={"feasible": False})
        >>> trial_category(trial)
        'infeasible'
    """
    if trial.state == TrialState.RUNNING:
        return "running"
    if trial.state == TrialState.WAITING:
        return "waiting"
    if not is_feasible(trial):
        return "infeasible"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, "failed")


def trial_config(trial: FrozenTrial) -> dict[str, Any]:
    """Slot name -> stored choice value (``config`` attribute; the params when it is missing)."""
    config = trial.user_attrs.get(CONFIG)
    if isinstance(config, dict):
        return dict(config)
    return dict(trial.params)


def trial_reason(trial: FrozenTrial) -> str | None:
    """Why the trial broke the budget or was pruned (None when it says nothing)."""
    return trial.user_attrs.get(INFEASIBLE_REASON) or trial.user_attrs.get(PRUNE_REASON)


def study_info(study: optuna.Study) -> dict[str, Any]:
    """The search settings stored on the study (empty when missing)."""
    info = study.user_attrs.get(STUDY_INFO)
    return dict(info) if isinstance(info, dict) else {}


def objective_names(study: optuna.Study, info: dict[str, Any]) -> list[str]:
    """A display name per objective: the stored ones, the monitor, or numbered names."""
    names = info.get("objectives")
    n = len(study.directions)
    if isinstance(names, list) and len(names) == n:
        return [str(name) for name in names]
    if n == 1:
        return [str(info.get("monitor") or "value")]
    return [f"objective {i}" for i in range(n)]


def number(value: Any) -> float | None:
    """A float for JSON, None for missing and non-finite values."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return None
    return as_float if math.isfinite(as_float) else None


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


def _counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counter = Counter(trial_category(t) for t in trials)
    return {"total": len(trials), **{state: counter.get(state, 0) for state in STATES}}


def _epochs_run(trial: FrozenTrial) -> int:
    try:
        return max(int(trial.user_attrs.get(EPOCHS, 0)), 0)
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
        stopped = [t for t in trials if trial_category(t) in ("pruned", "infeasible")]
        saved = sum(max(limit - _epochs_run(t), 0) for t in stopped)
    return {"run": run, "saved_by_pruning": saved, "max_epochs": limit}


def _reasons(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Infeasible trials by reason, most frequent first."""
    counter = Counter(
        str(trial_reason(t) or "unknown") for t in trials if trial_category(t) == "infeasible"
    )
    return dict(counter.most_common())


def _baselines(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    out = []
    for t in trials:
        label = t.user_attrs.get(BASELINE)
        if label is None:
            continue
        values = [number(v) for v in t.values] if t.values else None
        out.append(
            {
                "label": str(label),
                "trial": t.number,
                "state": trial_category(t),
                "value": values[0] if values else None,
                "values": values,
            }
        )
    return out


def _trial_seconds(trials: Sequence[FrozenTrial]) -> float:
    return sum(t.duration.total_seconds() for t in trials if t.duration is not None)


def _pareto(study: optuna.Study) -> list[dict[str, Any]] | None:
    """The Pareto front as ``[{trial, values, config}]`` (None for a single objective)."""
    if len(study.directions) == 1:
        return None
    return [
        {"trial": t.number, "values": [number(v) for v in t.values], "config": trial_config(t)}
        for t in pareto_trials(study)
    ]


def summarize(study: optuna.Study, *, elapsed: float | None = None) -> dict[str, Any]:
    """The summary of ``study`` (the content of ``summary.json``; keys in :func:`write_summary`).

    Args:
        study: the study.
        elapsed: wall-clock seconds of the search run, if known.

    Returns:
        A JSON-safe dict (non-finite numbers as None).
    """
    trials = study.get_trials(deepcopy=False)
    info = study_info(study)
    best = None if len(study.directions) > 1 else best_feasible_trial(study)
    summary = {
        "study_name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "monitor": info.get("monitor"),
        "mode": info.get("mode"),
        "objectives": objective_names(study, info),
        "model_class": info.get("model_class"),
        "slots": info.get("slots"),
        "best_value": number(best.values[0]) if best is not None else None,
        "best_trial": best.number if best is not None else None,
        "best_config": trial_config(best) if best is not None else None,
        "pareto": _pareto(study),
        "trials": _counts(trials),
        "infeasible_reasons": _reasons(trials),
        "baselines": _baselines(trials),
        "epochs": _epochs(trials, info.get("max_epochs")),
        "budget": info.get("budget"),
        "elapsed": number(elapsed),
        "trial_seconds": number(_trial_seconds(trials)),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return _json_safe(summary)


def write_summary(
    study: optuna.Study, out_dir: Path, *, elapsed: float | None = None
) -> dict[str, Any]:
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

    The returned summary can be handed to :func:`~autonorm.report.write_report` and
    :func:`~autonorm.report.attach_dashboard_artifacts`, so that an export computes it once.

    Args:
        study: the study.
        out_dir: the bundle folder (created when missing).
        elapsed: wall-clock seconds of the search run, if known.

    Returns:
        The summary, as written.
    """
    summary = summarize(study, elapsed=elapsed)
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(out_dir) / SUMMARY_FILE, text)
    return summary
