"""Progress of a search: a live display across its trials (rich), fed by Optuna callbacks or
by polling a study that worker processes run, and plain per-trial lines for worker logs."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from autonorm._trial_keys import CONFIG, FAIL_REASON, PRUNE_REASON, STUDY_INFO
from autonorm.report import config_runs, spent_epochs, trial_category


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class SearchProgress:
    """Optuna callback that renders: trial i of n, trials by state, best value and its config
    summary, elapsed time and an estimate of the time left.

    Use as a context manager around ``autonorm.search(..., callbacks=[progress])``.
    """

    def __init__(
        self, n_trials: int | None, console: Console | None = None, *, already_done: int = 0
    ) -> None:
        self.n_trials = n_trials
        self.compute = ""
        self.console = console or Console(stderr=True)
        self.started = time.time()
        self.already_done = already_done
        self.counts: dict[str, int] = {"complete": 0, "pruned": 0, "infeasible": 0, "failed": 0}
        self.best: str = "-"
        self.best_config: str = ""
        self.polled = False
        self.note = ""
        self._live = Live(
            self.render(), console=self.console, refresh_per_second=4, transient=False
        )

    def __enter__(self) -> SearchProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None and not self.polled and not any(self.counts.values()):
            # an error before any trial ended (bad input, a refused rerun): its one line is
            # the whole message, no empty panel above it
            self._live.transient = True
            self._live.__exit__(*exc)
            return
        self._live.update(self.render())
        self._live.__exit__(*exc)
        if not self.console.is_terminal:
            self.console.print()  # rich ends the last frame without a newline off a terminal

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not any(self.counts.values()):  # first trial of this process: a resumed study's
            finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            earlier = len(study.get_trials(deepcopy=False, states=finished))
            earlier -= trial.state in finished
            self.already_done = max(self.already_done, earlier)  # earlier trials count too
        self.counts[trial_category(trial)] += 1  # a finished trial: one of the four counted
        self._update_best(study)
        self._live.update(self.render())

    def update(self, study: optuna.Study, note: str = "") -> None:
        """Recount from all trials of ``study``: a display of a study other processes run.

        Args:
            study: the shared study.
            note: an extra line (e.g. the workers still running).
        """
        counts = dict.fromkeys(
            ("complete", "pruned", "infeasible", "failed", "running", "waiting"), 0
        )
        for trial in study.get_trials(deepcopy=False):
            counts[trial_category(trial)] += 1
        self.counts = counts
        self.polled = True
        self.note = note
        self._update_best(study)
        self._live.update(self.render())

    def _update_best(self, study: optuna.Study) -> None:
        info = study.user_attrs.get(STUDY_INFO) or {}
        if info.get("budget_epochs"):
            spent = spent_epochs(study.get_trials(deepcopy=False), info.get("learn_epochs", 0))
            self.compute = f"{spent} of {info['budget_epochs']:g} epochs"
        if len(study.directions) == 1:
            runs = config_runs(study)
            if runs:
                best, std = runs[0].trials[0], runs[0].std
                spread = "" if std is None else f" ± {std:.2g} over {len(runs[0].trials)} runs"
                self.best = f"{runs[0].mean:.4g}{spread} (trial {best.number})"
                config = best.user_attrs.get(CONFIG) or best.params
                kinds: dict[str, int] = {}
                for value in config.values():
                    name = value if isinstance(value, str) else value.get("name", "?")
                    kinds[name.split("(")[0]] = kinds.get(name.split("(")[0], 0) + 1
                self.best_config = ", ".join(f"{k}×{v}" for k, v in sorted(kinds.items()))

    def render(self) -> Group:
        elapsed = time.time() - self.started
        table = Table(show_header=False, box=None, pad_edge=False)
        total = self.n_trials
        if self.polled:
            done = sum(self.counts[k] for k in ("complete", "pruned", "infeasible"))
            left = total - done if total is not None else 0
            table.add_row("finished", f"{done}" + (f" of {total}" if total is not None else ""))
        else:
            done = sum(self.counts.values())
            left = total - self.already_done - done if total is not None else 0
            number = self.already_done + done + 1
            table.add_row(
                "trial", f"{min(number, total)} of {total}" if total is not None else f"{number}"
            )
        if self.compute:
            table.add_row("compute", self.compute)
        eta = _duration(elapsed / done * left) if done and left > 0 else "-"
        table.add_row("states", ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        table.add_row("best", self.best)
        if self.best_config:
            table.add_row("best config", self.best_config)
        table.add_row("time", f"{_duration(elapsed)} elapsed, ~{eta} left")
        if self.note:
            table.add_row("workers", self.note)
        return Group(Text("autonorm search", style="bold"), table)


class TrialLines:
    """Optuna callback writing one plain line per finished trial: the progress of a pool worker,
    whose output goes to a log file rather than a terminal.

    Args:
        prefix: start of each line, e.g. ``"worker 1/4"``.
        stream: where to write (default stderr).
    """

    def __init__(self, prefix: str, stream: IO[str] | None = None) -> None:
        self.prefix = prefix
        self.stream = stream

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = (
            "" if trial.values is None else " value " + ", ".join(f"{v:.4g}" for v in trial.values)
        )
        reason = trial.user_attrs.get(FAIL_REASON) or trial.user_attrs.get(PRUNE_REASON)
        line = f"{self.prefix}: trial {trial.number} {trial_category(trial)}{value}"
        print(line + (f" ({reason})" if reason else ""), file=self.stream or sys.stderr, flush=True)
