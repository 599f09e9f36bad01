"""The live display across trials, on real studies."""

from __future__ import annotations

import io

import optuna
from rich.console import Console

from autonorm.search._progress import SearchProgress


def render(progress: SearchProgress) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(progress.render())
    return buffer.getvalue()


CHOICES = ["batchnorm", "groupnorm(groups=4)", "layernorm"]


def objective(trial: optuna.Trial) -> float:
    trial.suggest_categorical("bn1", CHOICES)
    return float(trial.number)  # the first trial stays the best


def run_trials(study: optuna.Study, n: int, **kwargs) -> None:
    """``n`` trials, each its own config (one run each)."""
    for _ in range(n):
        study.enqueue_trial({"bn1": CHOICES[len(study.trials)]})
        study.optimize(objective, n_trials=1, **kwargs)


def test_a_resumed_study_counts_its_earlier_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    run_trials(study, 2)

    progress = SearchProgress(3, console=Console(file=io.StringIO()))
    resumed = optuna.load_study(study_name="s", storage=storage)
    run_trials(resumed, 1, callbacks=[progress])
    text = render(progress)
    assert "3 of 3" in text
    assert "complete 1" in text  # this process ran one; the display still knows of all three
    assert "(trial 0)" in text and "best config" in text
