"""``autonorm.report``: what a search found, for people and for programs.

Plain functions over an ``optuna.Study`` written by :func:`autonorm.search` (they also work on
any study whose trials carry autonorm's user attributes, or none of them):

* :func:`best_feasible_trial` and :func:`pareto_trials` pick the winners, skipping the trials
  that broke the budget (user attribute ``feasible=False``); :func:`trial_category` says in
  which state a trial counts (complete, pruned, infeasible, failed, running, waiting).
* :func:`write_summary` writes ``summary.json``, the machine-readable record of the search, and
  returns it as a :class:`Summary`: a ``TypedDict`` that describes the file key by key (its
  parts too: :class:`TrialCounts`, :class:`Certainty`, :class:`Candidate`, ...), so that a
  program reading ``summary.json`` can annotate what it loads and have mypy check every key.
* :func:`write_report` writes ``report.html``, one self-contained page of tables and plotly
  figures that opens offline.
* :func:`attach_dashboard_artifacts` uploads the bundle's files as study artifacts and writes a
  study note, so that ``optuna-dashboard STORAGE --artifact-dir OUT_DIR/artifacts`` shows them.

An export computes the summary once and hands it on::

    summary = write_summary(study, out_dir, elapsed=elapsed)
    write_report(study, out_dir / "report.html", summary=summary)
    attach_dashboard_artifacts(study, out_dir, files, summary=summary)

The trial attributes read here are the ones the search writes (names in
:mod:`autonorm._trial_keys`): ``config`` (slot name -> choice value, a label string or a dict),
``feasible`` (False when over the budget), ``infeasible_reason``, ``prune_reason``, ``epochs``
(epochs trained) and ``baseline`` (the label of a warm-start trial). The study attribute
``autonorm`` holds the search settings (``monitor``, ``mode``, ``objectives``, ``budget``,
``model_class``, ``slots``, ``max_epochs``); each may be missing.

Modules: :mod:`~autonorm.report._types` (the summary's types and the study settings' type,
:class:`StudyInfo`), :mod:`~autonorm.report._winners` (feasibility, best trial, Pareto front),
:mod:`~autonorm.report._summary` (trial categories, summary.json), :mod:`~autonorm.report._figures`
and :mod:`~autonorm.report._choices` (the plotly figures), :mod:`~autonorm.report._html` (the
page), :mod:`~autonorm.report._dashboard` (artifacts and the study note).
"""

from __future__ import annotations

from autonorm.report._dashboard import ARTIFACT_DIR, NOTE_HEADING, attach_dashboard_artifacts
from autonorm.report._html import write_report
from autonorm.report._summary import (
    SUMMARY_FILE,
    spent_epochs,
    trial_category,
    trial_config,
    write_summary,
)
from autonorm.report._types import (
    Baseline,
    BudgetLimits,
    Candidate,
    Certainty,
    Compute,
    Epochs,
    InferenceCost,
    ParetoPoint,
    SlotCost,
    SlotInfo,
    StudyInfo,
    Summary,
    TrialCounts,
)
from autonorm.report._winners import (
    ConfigRuns,
    best_feasible_trial,
    choice_certainty,
    config_runs,
    deployable_runs,
    is_feasible,
    params_key,
    pareto_trials,
    rank_runs,
)

__all__ = [
    "is_feasible",
    "params_key",
    "rank_runs",
    "spent_epochs",
    "ARTIFACT_DIR",
    "NOTE_HEADING",
    "SUMMARY_FILE",
    "ConfigRuns",
    "attach_dashboard_artifacts",
    "best_feasible_trial",
    "choice_certainty",
    "config_runs",
    "deployable_runs",
    "pareto_trials",
    "trial_category",
    "write_report",
    "trial_config",
    "write_summary",
    "Summary",
    "Baseline",
    "BudgetLimits",
    "Candidate",
    "Certainty",
    "Compute",
    "Epochs",
    "InferenceCost",
    "ParetoPoint",
    "SlotCost",
    "SlotInfo",
    "StudyInfo",
    "TrialCounts",
]
