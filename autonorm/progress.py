"""A live progress display across the trials of a search (rich)."""

from __future__ import annotations

import time
from typing import Any

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from autonorm.report import best_feasible_trial


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class SearchProgress:
    """Optuna callback that renders: trial i of n, trials by state, best value and its config
    summary, elapsed time and an estimate of the time left.

    Use as a context manager around ``autonorm.search(..., callbacks=[progress])``.
    """

    def __init__(self, n_trials: int, console: Console | None = None, *, already_done: int = 0) -> None:
        self.n_trials = n_trials
        self.console = console or Console(stderr=True)
        self.started = time.time()
        self.already_done = already_done
        self.counts: dict[str, int] = {"complete": 0, "pruned": 0, "infeasible": 0, "failed": 0}
        self.best: str = "-"
        self.best_config: str = ""
        self._live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> SearchProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.update(self.render())
        self._live.__exit__(*exc)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("feasible") is False:
            self.counts["infeasible"] += 1
        elif trial.state == optuna.trial.TrialState.COMPLETE:
            self.counts["complete"] += 1
        elif trial.state == optuna.trial.TrialState.PRUNED:
            self.counts["pruned"] += 1
        else:
            self.counts["failed"] += 1
        if len(study.directions) == 1:
            best = best_feasible_trial(study)
            if best is not None:
                self.best = f"{best.value:.4g} (trial {best.number})"
                config = best.user_attrs.get("config") or best.params
                kinds: dict[str, int] = {}
                for value in config.values():
                    name = value if isinstance(value, str) else value.get("name", "?")
                    kinds[name.split("(")[0]] = kinds.get(name.split("(")[0], 0) + 1
                self.best_config = ", ".join(f"{k}×{v}" for k, v in sorted(kinds.items()))
        self._live.update(self.render())

    def render(self) -> Group:
        done = sum(self.counts.values())
        elapsed = time.time() - self.started
        left = self.n_trials - self.already_done - done
        eta = _duration(elapsed / done * left) if done and left > 0 else "-"
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_row("trial", f"{min(self.already_done + done + 1, self.n_trials)} of {self.n_trials}")
        table.add_row("states", ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        table.add_row("best", self.best)
        if self.best_config:
            table.add_row("best config", self.best_config)
        table.add_row("time", f"{_duration(elapsed)} elapsed, ~{eta} left")
        return Group(Text("autonorm search", style="bold"), table)
