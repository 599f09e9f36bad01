"""The live display across trials, on real studies."""

from __future__ import annotations

import io
import time

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


def epochs_objective(trial: optuna.Trial) -> float:
    trial.suggest_categorical("bn1", CHOICES)
    trial.set_user_attr("epochs", 2)
    return 1.0


def budget_study(tmp_path, budget_epochs: float) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="b")
    study.set_user_attr("autonorm", {"budget_epochs": budget_epochs, "learn_epochs": 0})
    return study


def test_the_time_left_is_estimated_from_the_compute_budget(tmp_path):
    """No trial count (the staged search's budget is in epochs): the estimate is this
    process's time per epoch times the epochs left, not ``-``."""
    study = budget_study(tmp_path, 10)
    progress = SearchProgress(None, console=Console(file=io.StringIO()))
    assert progress.eta() == "-"  # no rate yet
    study.optimize(epochs_objective, n_trials=2, callbacks=[progress])
    progress.started -= 40 - (time.time() - progress.started)  # 40 s for 4 epochs
    assert progress.eta() == "0:01:00"  # 6 epochs left at 10 s each
    assert "~0:01:00 left" in render(progress) and "4 of 10 epochs" in render(progress)


def test_a_resumed_study_estimates_from_what_this_process_trained(tmp_path):
    study = budget_study(tmp_path, 10)
    study.optimize(epochs_objective, n_trials=3)  # 6 epochs before this process
    progress = SearchProgress(None, console=Console(file=io.StringIO()))
    study.optimize(epochs_objective, n_trials=1, callbacks=[progress])
    progress.started -= 20 - (time.time() - progress.started)  # 20 s for its 2 epochs
    assert progress.eta() == "0:00:20"  # 2 epochs left at 10 s each, not 8 s per epoch


def test_off_a_terminal_each_finished_trial_is_one_plain_line(tmp_path):
    """Output to a file: a line per trial as it finishes (also when polling a study that
    workers run: each trial once), and a summary at the end, no live display."""
    study = budget_study(tmp_path, 10)
    log = io.StringIO()
    progress = SearchProgress(None, console=Console(file=log))
    assert not progress.live
    with progress:
        study.optimize(epochs_objective, n_trials=2)
        progress.update(study)
        study.optimize(epochs_objective, n_trials=1)
        progress.update(study)
        progress.update(study)
    lines = log.getvalue().splitlines()
    assert [x.split("  ")[0] for x in lines[:3]] == ["trial 0", "trial 1", "trial 2"]
    assert "complete  value 1  2 epochs  [" in lines[0] and "×1]" in lines[0]
    assert lines[0].endswith("budget: 6 of 10 epochs left")  # as of the poll that saw it
    assert lines[2].endswith("budget: 4 of 10 epochs left")
    assert len(lines) == 4 and lines[3].startswith("autonorm search: complete 3")
    assert "compute 6 of 10 epochs" in lines[3]
