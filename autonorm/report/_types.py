"""The typed shape of ``summary.json`` and of the study settings the report reads.

:class:`Summary` is the summary exactly as :func:`~autonorm.report.write_summary` writes it: a
``TypedDict``, so it is the very dict that ``json.dump`` writes, and mypy checks every key the
page, the dashboard note and the export read. The nested parts have their own types
(:class:`TrialCounts`, :class:`Certainty`, :class:`Candidate`, ...). :class:`StudyInfo` is the
``autonorm`` study attribute the search stores (each key may be missing: a study written by an
older autonorm, or by hand).

This module does not use ``from __future__ import annotations``: ``NotRequired`` must be seen
when the classes are made, or their ``__required_keys__`` would claim every key.
"""

from collections.abc import Iterable
from typing import Literal, TypeAlias, get_args

from typing_extensions import NotRequired, TypedDict

#: A JSON value.
Json: TypeAlias = None | bool | int | float | str | list["Json"] | dict[str, "Json"]

#: A choice as a study stores it: a label (``"batchnorm"``) or a mapping with the parameters
#: (``{"name": "groupnorm", "groups": 4}``), as :meth:`autonorm.config.NormChoice.to_value`.
StoredChoice: TypeAlias = str | dict[str, Json]

#: A config as a study stores it: slot name -> choice.
Config: TypeAlias = dict[str, StoredChoice]

#: The category a trial counts in (:func:`~autonorm.report.trial_category`).
TrialCategory: TypeAlias = Literal[
    "complete", "pruned", "infeasible", "failed", "running", "waiting"
]
#: The trial categories, in display order.
STATES: tuple[TrialCategory, ...] = get_args(TrialCategory)


class SlotInfo(TypedDict):
    """A slot as the study's settings record it: its name and kind, and what the probe found
    (:meth:`autonorm.config.SlotRecord.to_value`)."""

    name: str
    kind: str
    layout: str
    num_features: int
    # a study written before the probe records were kept lacks these
    input_shape: NotRequired[list[int] | None]
    feeder: NotRequired[str | None]
    original: NotRequired[StoredChoice | None]


def slot_records(slots: Iterable[SlotInfo] | None) -> dict[str, SlotInfo]:
    """Slot name -> the study's record of it (a record without a name, from a study autonorm
    did not write, is left out)."""
    return {
        str(s["name"]): s for s in slots or [] if isinstance(s, dict) and s.get("name") is not None
    }


class BudgetLimits(TypedDict):
    """A budget as the study stores it (:meth:`autonorm.budget.Budget.to_dict`)."""

    max_memory: int | None
    batch_size: int | None
    max_params: int | None
    # a study written by an older autonorm lacks these
    devices: NotRequired[int]
    trainings: NotRequired[float | None]


class StudyInfo(TypedDict, total=False):
    """The search settings a study stores (user attribute ``autonorm``); each may be missing."""

    monitor: str
    mode: str
    objectives: list[str]
    budget: BudgetLimits | None
    space: dict[str, Json]
    model_class: str
    slots: list[SlotInfo]
    max_epochs: int
    warm_start: bool | str
    default_config: dict[str, Json] | None
    experiment: dict[str, Json]
    learned_config: dict[str, Json] | None
    learn_epochs: int
    staged: bool
    rung_epochs: int
    budget_epochs: float | None


class SlotCost(TypedDict):
    """One slot's chosen norm timed at inference."""

    choice: str
    input_shape: list[int]
    ms: float
    folds: bool


class InferenceCost(TypedDict):
    """What the chosen norms cost at inference (:func:`~autonorm.report._cost.inference_cost`)."""

    device: str
    slots: dict[str, SlotCost]
    total_ms: float
    folded_total_ms: float


class Candidate(TypedDict):
    """One of the best configs by mean: its runs and their mean ± std."""

    label: str
    trials: list[int]
    values: list[float | None]
    mean: float | None
    std: float | None
    config: Config


class Certainty(TypedDict):
    """How sure the choice of the best config over the runner-up is: the gap of their means
    (in the better direction), its standard error and the probability that the best is
    better (:func:`~autonorm.report.choice_certainty`)."""

    runner_up: str | None
    gap: float
    noise: float | None
    p_better: float | None


class Compute(TypedDict):
    """Compute spent, in epochs and in trainings of ``max_epochs`` (a learn pass's included),
    the budget in both, and the repeated proposals that reused an earlier result."""

    epochs: int
    trainings: float | None
    budget_epochs: float | None
    budget_trainings: float | None
    reused_trials: int


class ParetoPoint(TypedDict):
    """A trial on the Pareto front."""

    trial: int
    values: list[float | None]
    config: Config


class TrialCounts(TypedDict):
    """Trials in all and by category (a trial over the budget counts as infeasible)."""

    total: int
    complete: int
    pruned: int
    infeasible: int
    failed: int
    running: int
    waiting: int


class Baseline(TypedDict):
    """A warm-start trial."""

    label: str
    trial: int
    state: TrialCategory
    value: float | None
    values: list[float | None] | None


class Epochs(TypedDict):
    """Epochs trained in all, and saved by pruning and the budget."""

    run: int
    #: ``max_epochs`` times the pruned and infeasible trials, minus the epochs they trained
    #: (None without ``max_epochs``).
    saved_by_pruning: int | None
    max_epochs: int | None


class Deployable(TypedDict):
    """The best config of plain layers, when the best config keeps a SwitchableNorm."""

    trial: int
    label: str | None
    value: float | None
    std: float | None
    runs: int
    config: Config
    inference_cost: InferenceCost | None


class Summary(TypedDict):
    """``summary.json``: the machine-readable record of a search, as
    :func:`~autonorm.report.write_summary` writes it, keys in this order. Every key is always
    written; non-finite numbers are None (null)."""

    study_name: str
    #: ``"minimize"`` or ``"maximize"``, one per objective.
    directions: list[str]
    # from the study's ``autonorm`` attribute (None when missing):
    monitor: str | None
    mode: str | None
    #: a display name per objective (the stored ones, the monitor, or numbered names).
    objectives: list[str]
    model_class: str | None
    slots: list[SlotInfo] | None
    # single objective; None without a feasible complete trial:
    #: the mean of the best config's runs.
    best_value: float | None
    best_std: float | None
    best_runs: int | None
    #: the best config's first run.
    best_trial: int | None
    best_config: Config | None
    #: the best config's norms timed at inference on this machine, or None.
    inference_cost: InferenceCost | None
    #: when the best config keeps a SwitchableNorm (it mixes at inference: no folding, autonorm
    #: needed): the best-ranked config of plain layers, its runs and its inference cost; else
    #: None.
    deployable: Deployable | None
    #: the best configs by mean, best first (empty with several objectives).
    candidates: list[Candidate]
    #: the best config against the runner-up (None with fewer than two configs).
    certainty: Certainty | None
    compute: Compute
    #: several objectives: the feasible Pareto front; None with one objective.
    pareto: list[ParetoPoint] | None
    trials: TrialCounts
    #: infeasible trials by reason, most frequent first.
    infeasible_reasons: dict[str, int]
    baselines: list[Baseline]
    epochs: Epochs
    #: the budget as the study stores it.
    budget: BudgetLimits | None
    #: wall-clock seconds of the search run, as given.
    elapsed: float | None
    #: the sum of the trials' durations, in seconds.
    trial_seconds: float | None
    #: UTC, ISO 8601.
    written_at: str
