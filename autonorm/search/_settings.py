"""The settings of one search, validated once: what :func:`autonorm.search` was asked to do."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autonorm._errors import AutoNormError
from autonorm.budget import Budget, as_budget
from autonorm.search_spaces import SearchSpace, resolve_space

#: Secondary objectives of a multi-objective search (minimized) -> the trial measurement.
EXTRA_OBJECTIVES = {"peak_memory": "peak_memory", "latency": "step_time", "params": "n_params"}
METRIC = "metric"
#: Training epochs of a trial when ``trainer_kwargs`` does not say.
DEFAULT_MAX_EPOCHS = 3
#: Trials of a search bounded by neither ``n_trials`` nor a compute budget (no warm start).
DEFAULT_N_TRIALS = 20
#: How the learn pass of each learned warm start mixes: softmax SN (``"learn"``, the default:
#: its derived configs retrained better at small batches in ``benchmarks/bench_search.py``) or
#: Sparse SN (``"learn-sparse"``, Shao et al. 2019).
LEARN_MIXINGS = {"learn": "softmax", "learn-sparse": "sparsestmax"}
WARM_STARTS = (True, False, *LEARN_MIXINGS)
#: Folder of the bundles whose ``out_dir`` is not given, under the working directory.
RUNS_FOLDER = "autonorm-runs"


def default_study_name(model_class_name: str) -> str:
    """The study name of a search not given one: ``autonorm-<ModelClass>``."""
    return f"autonorm-{model_class_name}"


def default_out_dir(study_name: str) -> Path:
    """The bundle folder of a study not given one: ``./autonorm-runs/<study name>``."""
    return Path.cwd() / RUNS_FOLDER / study_name


def writable_out_dir(out_dir: str | os.PathLike[str] | None, study_name: str) -> Path:
    """``out_dir`` (or the default folder), created, and checked to be writable."""
    out = Path(out_dir) if out_dir is not None else default_out_dir(study_name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / f".write-test-{os.getpid()}"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as err:
        raise AutoNormError(
            f"out_dir {str(out)!r} cannot be written: {err.strerror or err}"
        ) from None
    return out


def _objectives(objectives: Sequence[str] | None) -> list[str]:
    names = list(objectives) if objectives else [METRIC]
    if (
        names[0] != METRIC
        or any(o not in EXTRA_OBJECTIVES for o in names[1:])
        or len(set(names)) != len(names)
    ):
        raise ValueError(
            f"`objectives` must start with 'metric' followed by distinct names from "
            f"{sorted(EXTRA_OBJECTIVES)}, got {names}"
        )
    return names


@dataclass(frozen=True)
class SearchSettings:
    """Every argument of :func:`autonorm.search` except the model and the data, checked and
    resolved (budget coerced, space resolved for the budget, grace period and epochs filled in).
    """

    n_trials: int | None = None
    timeout: float | None = None
    space: SearchSpace = field(default_factory=lambda: resolve_space("auto"))
    budget: Budget | None = None
    monitor: str = "val_loss"
    mode: str = "min"
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    storage: Any = None
    study_name: str | None = None
    out_dir: str | os.PathLike[str] | None = None
    sampler: Any = "tpe"
    pruner: Any = "median"
    seed: int | None = None
    warm_start: bool | str = True
    objectives: list[str] = field(default_factory=lambda: [METRIC])
    example_input: Any = None
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    retrain: bool = False
    verbose: bool = False
    callbacks: Sequence[Callable[..., None]] = ()
    heartbeat_interval: float = 10.0
    grace_period: float = 40.0
    export: bool = True

    @classmethod
    def from_arguments(cls, **kwargs: Any) -> SearchSettings:
        """Validate :func:`autonorm.search`'s keyword arguments (raw, as the user gave them).

        Raises:
            ValueError: the first argument that does not hold, naming it and the value given.
        """
        n_trials = kwargs["n_trials"]
        if n_trials is not None and (
            isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1
        ):
            raise ValueError(f"`n_trials` must be a positive int or None, got {n_trials!r}")
        timeout = kwargs["timeout"]
        if timeout is not None and not timeout > 0:
            raise ValueError(f"`timeout` must be > 0 seconds, got {timeout!r}")
        if kwargs["mode"] not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {kwargs['mode']!r}")
        beat = kwargs["heartbeat_interval"]
        if not beat > 0:
            raise ValueError(f"`heartbeat_interval` must be > 0 seconds, got {beat!r}")
        grace = 4.0 * beat if kwargs["grace_period"] is None else kwargs["grace_period"]
        if not grace > beat:
            raise ValueError(
                f"`grace_period` must be longer than `heartbeat_interval`, got grace_period="
                f"{grace!r}, heartbeat_interval={beat!r}"
            )
        if kwargs["warm_start"] not in WARM_STARTS:
            raise ValueError(
                f"`warm_start` must be True, False, 'learn' or 'learn-sparse', got "
                f"{kwargs['warm_start']!r}"
            )
        for name in ("storage", "out_dir", "study_name"):
            value = kwargs[name]
            if isinstance(value, (str, os.PathLike)) and not str(os.fspath(value)).strip():
                raise ValueError(f"`{name}` must not be empty (leave it out for the default)")
        budget = as_budget(kwargs["budget"])
        trainer_kwargs = dict(kwargs["trainer_kwargs"] or {})
        trainer_kwargs.setdefault("max_epochs", DEFAULT_MAX_EPOCHS)
        return cls(
            **{
                **kwargs,
                "objectives": _objectives(kwargs["objectives"]),
                "budget": budget,
                "space": resolve_space(kwargs["space"]).for_budget(budget),
                "trainer_kwargs": trainer_kwargs,
                "grace_period": grace,
                "callbacks": list(kwargs["callbacks"]),
            }
        )

    @property
    def budget_trainings(self) -> float | None:
        """The compute budget in trainings, when the budget gives one."""
        return None if self.budget is None else self.budget.trainings

    @property
    def max_epochs(self) -> int:
        return int(self.trainer_kwargs["max_epochs"])

    @property
    def directions(self) -> list[str]:
        """``"min"`` / ``"max"`` per objective (the extra objectives are minimized)."""
        return [self.mode] + ["min"] * (len(self.objectives) - 1)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1
