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
from typing import cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from autonorm._io import atomic_write
from autonorm._trial_keys import (
    BASELINE,
    CONFIG,
    EPOCHS,
    INFEASIBLE_REASON,
    PRUNE_REASON,
    REUSED_FROM,
    STUDY_INFO,
)
from autonorm.report._cost import inference_cost
from autonorm.report._types import (
    Baseline,
    Candidate,
    Compute,
    Config,
    Deployable,
    Epochs,
    Json,
    ParetoPoint,
    StudyInfo,
    Summary,
    TrialCategory,
    TrialCounts,
)
from autonorm.report._winners import (
    ConfigRuns,
    choice_certainty,
    config_runs,
    deployable_runs,
    is_feasible,
    maximizes,
    pareto_trials,
)

#: File name of the summary inside a bundle folder.
SUMMARY_FILE = "summary.json"

#: Optuna states of a trial that has ended.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def trial_category(trial: FrozenTrial) -> TrialCategory:
    """The category of a trial, one of :data:`~autonorm.report._types.STATES`.

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
    if trial.state == TrialState.COMPLETE:
        return "complete"
    return "pruned" if trial.state == TrialState.PRUNED else "failed"


def trial_config(trial: FrozenTrial) -> Config:
    """Slot name -> stored choice value (``config`` attribute; the params when it is missing)."""
    config = trial.user_attrs.get(CONFIG)
    if isinstance(config, dict):
        return dict(config)
    return dict(trial.params)


def trial_reason(trial: FrozenTrial) -> str | None:
    """Why the trial broke the budget or was pruned (None when it says nothing)."""
    return trial.user_attrs.get(INFEASIBLE_REASON) or trial.user_attrs.get(PRUNE_REASON)


def study_info(study: optuna.Study) -> StudyInfo:
    """The search settings stored on the study (empty when missing)."""
    info = study.user_attrs.get(STUDY_INFO)
    return cast(StudyInfo, dict(info)) if isinstance(info, dict) else {}


def objective_names(study: optuna.Study, info: StudyInfo) -> list[str]:
    """A display name per objective: the stored ones, the monitor, or numbered names."""
    names = info.get("objectives")
    n = len(study.directions)
    if isinstance(names, list) and len(names) == n:
        return [str(name) for name in names]
    if n == 1:
        return [str(info.get("monitor") or "value")]
    return [f"objective {i}" for i in range(n)]


def number(value: float | None) -> float | None:
    """A float for JSON, None for missing and non-finite values."""
    return float(value) if value is not None and math.isfinite(value) else None


def _json_safe(obj: object) -> Json:
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


def _counts(trials: Sequence[FrozenTrial]) -> TrialCounts:
    counter = Counter(trial_category(t) for t in trials)
    return TrialCounts(
        total=len(trials),
        complete=counter["complete"],
        pruned=counter["pruned"],
        infeasible=counter["infeasible"],
        failed=counter["failed"],
        running=counter["running"],
        waiting=counter["waiting"],
    )


def _epochs_run(trial: FrozenTrial) -> int:
    try:
        return max(int(trial.user_attrs.get(EPOCHS, 0)), 0)
    except (TypeError, ValueError):
        return 0


def spent_epochs(trials: Sequence[FrozenTrial], learn_epochs: int = 0) -> int:
    """The compute a study spent, in epochs: every finished trial's epochs (a reused result
    trained none) and a learn pass's. The staged plan's budget, the progress display and the
    summary all count it here."""
    return int(learn_epochs) + sum(_epochs_run(t) for t in trials if t.state.is_finished())


def _epochs(trials: Sequence[FrozenTrial], max_epochs: int | None) -> Epochs:
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
    return Epochs(run=run, saved_by_pruning=saved, max_epochs=limit)


def _reasons(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Infeasible trials by reason, most frequent first."""
    counter = Counter(
        str(trial_reason(t) or "unknown") for t in trials if trial_category(t) == "infeasible"
    )
    return dict(counter.most_common())


def _baselines(trials: Sequence[FrozenTrial]) -> list[Baseline]:
    out: list[Baseline] = []
    for t in trials:
        label = t.user_attrs.get(BASELINE)
        if label is None:
            continue
        values = [number(v) for v in t.values] if t.values else None
        out.append(
            Baseline(
                label=str(label),
                trial=t.number,
                state=trial_category(t),
                value=values[0] if values else None,
                values=values,
            )
        )
    return out


def _trial_seconds(trials: Sequence[FrozenTrial]) -> float:
    return sum(t.duration.total_seconds() for t in trials if t.duration is not None)


def _pareto(study: optuna.Study) -> list[ParetoPoint] | None:
    """The Pareto front as ``[{trial, values, config}]`` (None for a single objective)."""
    if len(study.directions) == 1:
        return None
    return [
        ParetoPoint(trial=t.number, values=[number(v) for v in t.values], config=trial_config(t))
        for t in pareto_trials(study)
    ]


#: Candidates listed in the summary (best mean first).
CANDIDATES_LISTED = 10


def _candidates(runs: Sequence[ConfigRuns]) -> list[Candidate]:
    """The best configs by mean: their label, runs, mean ± std."""
    return [
        Candidate(
            label=r.label or f"trial {r.trials[0].number}",
            trials=[t.number for t in r.trials],
            values=[number(v) for v in r.values],
            mean=number(r.mean),
            std=number(r.std),
            config=trial_config(r.trials[0]),
        )
        for r in runs[:CANDIDATES_LISTED]
    ]


def _deployable(runs: Sequence[ConfigRuns], info: StudyInfo) -> Deployable | None:
    """The best config of plain layers when the best one keeps a SwitchableNorm."""
    plain = deployable_runs(runs, trial_config)
    if plain is None:
        return None
    config = trial_config(plain.trials[0])
    return Deployable(
        trial=plain.trials[0].number,
        label=plain.label,
        value=number(plain.mean),
        std=number(plain.std),
        runs=len(plain.trials),
        config=config,
        inference_cost=inference_cost(info.get("slots"), config),
    )


def _compute(trials: Sequence[FrozenTrial], info: StudyInfo) -> Compute:
    """Compute spent, in epochs and in trainings of ``max_epochs``."""
    spent = spent_epochs(trials, info.get("learn_epochs") or 0)
    max_epochs = info.get("max_epochs")
    budget = info.get("budget_epochs")
    return Compute(
        epochs=spent,
        trainings=spent / max_epochs if max_epochs else None,
        budget_epochs=budget,
        budget_trainings=budget / max_epochs if budget and max_epochs else None,
        reused_trials=sum(REUSED_FROM in t.user_attrs for t in trials),
    )


def summarize(study: optuna.Study, *, elapsed: float | None = None) -> Summary:
    """The summary of ``study`` (the content of ``summary.json``, see :class:`Summary`).

    Args:
        study: the study.
        elapsed: wall-clock seconds of the search run, if known.

    Returns:
        A JSON-safe dict (non-finite numbers as None).
    """
    trials = study.get_trials(deepcopy=False)
    info = study_info(study)
    runs = [] if len(study.directions) > 1 else config_runs(study)
    best = runs[0] if runs else None
    best_config = trial_config(best.trials[0]) if best is not None else None
    summary: Summary = {
        "study_name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "monitor": info.get("monitor"),
        "mode": info.get("mode"),
        "objectives": objective_names(study, info),
        "model_class": info.get("model_class"),
        "slots": info.get("slots"),
        "best_value": number(best.mean) if best is not None else None,
        "best_std": number(best.std) if best is not None else None,
        "best_runs": len(best.trials) if best is not None else None,
        "best_trial": best.trials[0].number if best is not None else None,
        "best_config": best_config,
        "inference_cost": inference_cost(info.get("slots"), best_config),
        "deployable": _deployable(runs, info),
        "candidates": _candidates(runs),
        "certainty": choice_certainty(runs, maximizes(study)) if runs else None,
        "compute": _compute(trials, info),
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
    return cast(Summary, _json_safe(summary))


def write_summary(study: optuna.Study, out_dir: Path, *, elapsed: float | None = None) -> Summary:
    """Write ``out_dir/summary.json`` (atomically) and return its content.

    The content is a :class:`~autonorm.report.Summary` (its keys, and what each holds, are
    documented there); non-finite numbers are written as null.

    The returned summary can be handed to :func:`~autonorm.report.write_report` and
    :func:`~autonorm.report.attach_dashboard_artifacts`, so that an export computes it once.

    Args:
        study: the study.
        out_dir: the bundle folder (created when missing).
        elapsed: wall-clock seconds of the search run, if known.

    Returns:
        The summary, as written (the dict ``json.dump`` wrote, typed).
    """
    summary = summarize(study, elapsed=elapsed)
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(out_dir) / SUMMARY_FILE, text)
    return summary
