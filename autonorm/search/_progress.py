"""Progress of a search: a live display across its trials (rich) on a terminal, one plain line
per finished trial and a summary elsewhere (a log file, CI, a job scheduler), fed by Optuna
callbacks or by polling a study that worker processes run."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from autonorm._trial_keys import (
    BASELINE,
    CONFIG,
    FAIL_REASON,
    INFEASIBLE_REASON,
    PRUNE_REASON,
    STAGE,
    STUDY_INFO,
)
from autonorm.report import config_runs, spent_epochs, trial_category


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def config_label(trial: optuna.trial.FrozenTrial) -> str:
    """A trial's config in a few words: its warm-start label (``own norms``,
    ``uniform:batchnorm``) or its choices counted by family (``batchnorm×3, layernorm×1``)."""
    if BASELINE in trial.user_attrs:
        return str(trial.user_attrs[BASELINE])
    config = trial.user_attrs.get(CONFIG) or trial.params
    kinds: dict[str, int] = {}
    for value in config.values():
        name = value if isinstance(value, str) else value.get("name", "?")
        family = name.split("(")[0]
        kinds[family] = kinds.get(family, 0) + 1
    return ", ".join(f"{k}×{v}" for k, v in sorted(kinds.items()))


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One finished trial in one line: number, stage, state, value, epochs, config, reason."""
    parts = [f"trial {trial.number}"]
    if trial.user_attrs.get(STAGE):
        parts.append(str(trial.user_attrs[STAGE]))
    parts.append(trial_category(trial))
    if trial.values is not None:
        parts.append("value " + ", ".join(f"{v:.4g}" for v in trial.values))
    parts.append(f"{spent_epochs([trial])} epochs")
    label = config_label(trial)
    line = "  ".join(parts) + (f"  [{label}]" if label else "")
    reason = next(
        (
            trial.user_attrs[key]
            for key in (FAIL_REASON, INFEASIBLE_REASON, PRUNE_REASON)
            if trial.user_attrs.get(key)
        ),
        None,
    )
    return line + (f" ({reason})" if reason else "")


class SearchProgress:
    """Optuna callback that shows a search's progress: trial i of n, trials by state, the
    compute spent, the best value and its config, elapsed time and an estimate of the time left
    (from the compute or the trials done so far).

    On a terminal it is a live display. Elsewhere (output to a file or a pipe) it writes one
    plain line per finished trial, with the elapsed time and the budget left, and a summary at
    the end.

    Use as a context manager around ``autonorm.search(..., callbacks=[progress])``.
    """

    def __init__(
        self, n_trials: int | None, console: Console | None = None, *, already_done: int = 0
    ) -> None:
        self.n_trials = n_trials
        self.compute = ""
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.started = time.time()
        self.already_done = already_done
        self.counts: dict[str, int] = {"complete": 0, "pruned": 0, "infeasible": 0, "failed": 0}
        self.best: str = "-"
        self.best_config: str = ""
        self.polled = False
        self.note = ""
        self.budget_epochs: float | None = None
        self.spent = 0
        self._spent_before: int | None = None  # epochs spent before this process watched
        self._written: set[int] = set()  # trials given their plain line
        self._live = Live(
            self.render(), console=self.console, refresh_per_second=4, transient=False
        )

    def __enter__(self) -> SearchProgress:
        if self.live:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        quiet = exc[0] is not None and not self.polled and not any(self.counts.values())
        if not self.live:
            if not quiet:  # an error before any trial ended: its one line is the whole message
                self._write(self.summary())
            return
        if quiet:  # no empty panel above the error's line
            self._live.transient = True
            self._live.__exit__(*exc)
            return
        self._live.update(self.render())
        self._live.__exit__(*exc)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not any(self.counts.values()):  # first trial of this process: a resumed study's
            finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            earlier = len(study.get_trials(deepcopy=False, states=finished))
            earlier -= trial.state in finished
            self.already_done = max(self.already_done, earlier)  # earlier trials count too
        self.counts[trial_category(trial)] += 1  # a finished trial: one of the four counted
        self._update_best(study, new=[trial])
        self._show([trial])

    def update(self, study: optuna.Study, note: str = "") -> None:
        """Recount from all trials of ``study``: a display of a study other processes run.

        Args:
            study: the shared study.
            note: an extra line (e.g. the workers still running).
        """
        counts = dict.fromkeys(
            ("complete", "pruned", "infeasible", "failed", "running", "waiting"), 0
        )
        trials = study.get_trials(deepcopy=False)
        for trial in trials:
            counts[trial_category(trial)] += 1
        self.counts = counts
        self.polled = True
        self.note = note
        new = [t for t in trials if t.state.is_finished() and t.number not in self._written]
        self._update_best(study, new=new)
        self._show(new)

    def _show(self, finished: list[optuna.trial.FrozenTrial]) -> None:
        if self.live:
            self._live.update(self.render())
            return
        for trial in finished:
            self._written.add(trial.number)
            self._write(f"{trial_line(trial)}  {self._time_line()}")

    def _write(self, line: str) -> None:
        self.console.print(Text(line), soft_wrap=True)

    def _update_best(
        self, study: optuna.Study, new: list[optuna.trial.FrozenTrial] | None = None
    ) -> None:
        info = study.user_attrs.get(STUDY_INFO) or {}
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        self.spent = spent_epochs(finished, info.get("learn_epochs", 0))
        if self._spent_before is None:  # what this process did not train has no time in it
            fresh = {t.number for t in new or []}
            self._spent_before = spent_epochs([t for t in finished if t.number not in fresh])
        if info.get("budget_epochs"):
            self.budget_epochs = float(info["budget_epochs"])
            self.compute = f"{self.spent} of {info['budget_epochs']:g} epochs"
        if len(study.directions) == 1:
            runs = config_runs(study)
            if runs:
                best, std = runs[0].trials[0], runs[0].std
                spread = "" if std is None else f" ± {std:.2g} over {len(runs[0].trials)} runs"
                self.best = f"{runs[0].mean:.4g}{spread} (trial {best.number})"
                self.best_config = config_label(best)

    def _done_and_left(self) -> tuple[int, int]:
        """Trials finished (by this process, or all when polled) and trials still to run."""
        total = self.n_trials
        if self.polled:
            done = sum(self.counts[k] for k in ("complete", "pruned", "infeasible"))
            return done, (total - done if total is not None else 0)
        done = sum(self.counts.values())
        return done, (total - self.already_done - done if total is not None else 0)

    def eta(self) -> str:
        """The time left: from the compute rate of this process when the budget is in epochs,
        else from its trials' rate; ``-`` before there is a rate."""
        elapsed = time.time() - self.started
        if self.n_trials is None and self.budget_epochs is not None:
            trained = self.spent - (self._spent_before or 0)
            left_epochs = self.budget_epochs - self.spent
            if trained > 0 and left_epochs > 0:
                return _duration(elapsed / trained * left_epochs)
            return "0:00:00" if left_epochs <= 0 and trained > 0 else "-"
        done, left = self._done_and_left()
        return _duration(elapsed / done * left) if done and left > 0 else "-"

    def _time_line(self) -> str:
        elapsed = _duration(time.time() - self.started)
        if self.budget_epochs is not None:
            left = max(self.budget_epochs - self.spent, 0)
            budget = f"{left:g} of {self.budget_epochs:g} epochs left"
        elif self.n_trials is not None:
            budget = f"{max(self._done_and_left()[1], 0)} of {self.n_trials} trials left"
        else:
            budget = "no budget"
        return f"{elapsed} elapsed, ~{self.eta()} left, budget: {budget}"

    def summary(self) -> str:
        """The search in one line: trials by state, compute, best value and its config, time."""
        states = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        compute = f", compute {self.compute}" if self.compute else ""
        best = f", best {self.best}" + (f" [{self.best_config}]" if self.best_config else "")
        elapsed = _duration(time.time() - self.started)
        return f"autonorm search: {states}{compute}{best}, {elapsed} elapsed"

    def render(self) -> Group:
        table = Table(show_header=False, box=None, pad_edge=False)
        total = self.n_trials
        done, _ = self._done_and_left()
        if self.polled:
            table.add_row("finished", f"{done}" + (f" of {total}" if total is not None else ""))
        else:
            number = self.already_done + done + 1
            table.add_row(
                "trial", f"{min(number, total)} of {total}" if total is not None else f"{number}"
            )
        if self.compute:
            table.add_row("compute", self.compute)
        table.add_row("states", ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        table.add_row("best", self.best)
        if self.best_config:
            table.add_row("best config", self.best_config)
        elapsed = _duration(time.time() - self.started)
        table.add_row("time", f"{elapsed} elapsed, ~{self.eta()} left")
        if self.note:
            table.add_row("workers", self.note)
        return Group(Text("autonorm search", style="bold"), table)


class TrialLines:
    """Optuna callback writing one plain line per finished trial (:func:`trial_line`): the
    progress of a pool worker, whose output goes to a log file rather than a terminal.

    Args:
        prefix: start of each line, e.g. ``"worker 1/4"``.
        stream: where to write (default stderr).
    """

    def __init__(self, prefix: str, stream: IO[str] | None = None) -> None:
        self.prefix = prefix
        self.stream = stream

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        print(f"{self.prefix}: {trial_line(trial)}", file=self.stream or sys.stderr, flush=True)
