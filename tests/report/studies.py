"""Real Optuna studies (SQLite, no mocks) shaped like the ones autonorm's search writes, for the
report tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import optuna

from autonorm._trial_keys import (
    BASELINE,
    CONFIG,
    EPOCHS,
    FEASIBLE,
    INCUMBENT,
    INFEASIBLE_REASON,
    PRUNE_REASON,
    RUN_INDEX,
    STUDY_INFO,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SLOTS = ["stem.bn", "layer1.0.bn1", "head.norm"]
CHOICES = ["batchnorm", "groupnorm(g=4)", "layernorm"]
MAX_EPOCHS = 3
PLOTLY_MARKER = "* plotly.js v"  # the banner at the top of the inlined plotly.js bundle


def stored_choice(label: str) -> str | dict:
    """Choices as the search stores them: a label, or a dict for a parametrized norm."""
    return {"name": "groupnorm", "groups": 4} if label == "groupnorm(g=4)" else label


def toy_objective(trial: optuna.Trial) -> float:
    """A toy search trial: the value is the sum of the choice indices (plus a per-epoch offset),
    and the enqueued ``plan`` attribute says how the trial ends, as autonorm's search would."""
    config = {slot: trial.suggest_categorical(slot, CHOICES) for slot in SLOTS}
    trial.set_user_attr(CONFIG, {k: stored_choice(v) for k, v in config.items()})
    plan = trial.user_attrs.get("plan", "complete")
    value = float(sum(CHOICES.index(c) for c in config.values()))
    if plan == "fail":
        raise RuntimeError("boom")
    if plan == "over_budget_at_start":
        trial.set_user_attr(FEASIBLE, False)
        trial.set_user_attr(INFEASIBLE_REASON, "peak memory 9 GiB > budget max_memory=1 GiB")
        raise optuna.TrialPruned("Trial is infeasible: peak memory.")
    for epoch in range(MAX_EPOCHS):
        trial.report(value + 0.1 * (MAX_EPOCHS - 1 - epoch), step=epoch)
        trial.set_user_attr(EPOCHS, epoch + 1)
        if plan == "pruned" and epoch == 0:
            trial.set_user_attr(PRUNE_REASON, "pruned by MedianPruner at epoch 0")
            raise optuna.TrialPruned("Trial was pruned at epoch 0.")
    if plan == "over_budget_at_end":  # over the budget, but it still returns a value
        trial.set_user_attr(FEASIBLE, False)
        trial.set_user_attr(INFEASIBLE_REASON, "12000 parameters > budget max_params=1000")
    return value


def params(*labels: str) -> dict[str, str]:
    """The params of a trial that gives ``SLOTS`` these choices."""
    return dict(zip(SLOTS, labels, strict=True))


def make_study(
    tmp_path: Path,
    plans: list[tuple[dict[str, str], dict]],
    *,
    direction: Literal["minimize", "maximize"] = "minimize",
    name: str = "autonorm-Toy",
) -> optuna.Study:
    """A single-objective study with the search's settings attribute, one trial a plan:
    ``(params, user_attrs)``, where the ``plan`` attribute says how the trial ends."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        study_name=name,
        direction=direction,
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.NopPruner(),
    )
    study.set_user_attr(
        STUDY_INFO,
        {
            "monitor": "val_loss",
            "mode": "min" if direction == "minimize" else "max",
            "objectives": ["val_loss"],
            "budget": {"max_memory": 1 << 30, "batch_size": None, "max_params": 1000},
            "space": {"name": "toy"},
            "model_class": "tests.Toy",
            "slots": [
                {"name": s, "kind": "BatchNorm2d", "num_features": 8, "layout": "channels_first"}
                for s in SLOTS
            ],
            "max_epochs": MAX_EPOCHS,
        },
    )
    for trial_params, attrs in plans:
        study.enqueue_trial(trial_params, user_attrs=attrs)
    study.optimize(toy_objective, n_trials=len(plans), catch=(RuntimeError,))
    return study


MIXED = [
    (params("groupnorm(g=4)", "groupnorm(g=4)", "groupnorm(g=4)"), {BASELINE: "own norms"}),
    (params("batchnorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_end"}),  # value 0
    (params("batchnorm", "batchnorm", "groupnorm(g=4)"), {}),  # value 1: the best feasible
    (params("batchnorm", "groupnorm(g=4)", "layernorm"), {"plan": "pruned"}),
    (params("layernorm", "layernorm", "batchnorm"), {"plan": "over_budget_at_start"}),
    (params("layernorm", "batchnorm", "batchnorm"), {"plan": "fail"}),
    (params("layernorm", "layernorm", "layernorm"), {}),  # value 6
]


def multi_objective_study(tmp_path: Path, points: list[tuple[float, float, bool]]) -> optuna.Study:
    """A two-objective study, one trial a point ``(value 0, value 1, feasible)``."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'multi.db'}",
        study_name="multi",
        directions=["minimize", "minimize"],
    )
    study.set_user_attr(STUDY_INFO, {"monitor": "val_loss", "objectives": ["val_loss", "params"]})
    for i, (a, b, feasible) in enumerate(points):
        study.enqueue_trial(
            {SLOTS[0]: CHOICES[i % 3]}, user_attrs={"point": [a, b], "feasible_plan": feasible}
        )

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        choice = trial.suggest_categorical(SLOTS[0], CHOICES)
        trial.set_user_attr(CONFIG, {SLOTS[0]: choice})
        if not trial.user_attrs["feasible_plan"]:
            trial.set_user_attr(FEASIBLE, False)
        a, b = trial.user_attrs["point"]
        return a, b

    study.optimize(objective, n_trials=len(points))
    return study


def paired_runs_study(values: dict[str, list[float]], guards: dict[str, Any]) -> optuna.Study:
    """An in-memory maximizing study of full runs: config ``name``'s k-th run (run index k,
    its seed's place) has the k-th value; ``guards`` marks the configs kept without evidence
    (the ``incumbent`` attribute's value)."""
    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.CategoricalDistribution(list(values))
    for name, runs in values.items():
        for index, value in enumerate(runs):
            attrs = {RUN_INDEX: index, BASELINE: name}
            if name in guards:
                attrs[INCUMBENT] = guards[name]
            study.add_trial(
                optuna.trial.create_trial(
                    params={"p": name},
                    distributions={"p": distribution},
                    value=value,
                    user_attrs=attrs,
                )
            )
    return study
