"""``autonorm search``: LightningCLI-style arguments (jsonargparse) -> :func:`autonorm.search`,
one process or a local pool of workers."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from autonorm._errors import UsageError
from autonorm._io import mask_password
from autonorm.cli._output import console, print_result
from autonorm.cli._user_code import import_class

#: ``--search.<name>`` options: (name, type, default, help).
_SEARCH_OPTIONS: list[tuple[str, Any, Any, str | None]] = [
    ("n_trials", int | None, None, "total finished trials (default: the compute budget decides)"),
    ("timeout", float | None, None, "seconds"),
    ("space", str, "auto", "preset name or YAML file"),
    (
        "choices",
        list[str] | str | None,
        None,
        "restrict every slot to these norms (names or labels), e.g. "
        "[batchnorm,groupnorm(groups=8),layernorm]",
    ),
    ("budget.max_memory", str | None, None, "e.g. 8GiB"),
    ("budget.batch_size", int | None, None, None),
    ("budget.max_params", int | None, None, None),
    (
        "budget.trainings",
        float | None,
        None,
        "compute of the search in trainings of max_epochs (default: the uniform grid's)",
    ),
    (
        "budget.devices",
        int | None,
        None,
        "devices of the final training (more than 1 offers syncbatchnorm)",
    ),
    ("weight_norms", bool, False, "also search +ws/+wn pairs on slots fed by a Conv/Linear"),
    ("monitor", str, "val_loss", None),
    ("mode", str, "min", "min or max"),
    (
        "storage",
        str | None,
        None,
        "SQLAlchemy URL or journal file (default: $AUTONORM_STORAGE, which keeps a password off "
        "the command line)",
    ),
    ("study_name", str | None, None, None),
    ("out_dir", str | None, None, None),
    ("sampler", str, "tpe", "tpe or random"),
    ("pruner", str, "median", "median, hyperband or none"),
    ("seed", int | None, None, None),
    (
        "warm_start",
        bool | Literal["learn", "learn-sparse"],
        True,
        "true: staged search (screen own norms and every uniform family, promote the best, "
        "refine groups of slots, re-evaluate the leaders); learn: first one learned "
        "SwitchableNorm run whose derived config joins the screen and narrows each slot's "
        "choices; learn-sparse: the same with Sparse SwitchableNorm",
    ),
    ("objectives", list[str] | None, None, "e.g. [metric,peak_memory]"),
    ("retrain", bool, False, None),
    ("verbose", bool, False, "per-trial progress bars"),
    (
        "n_workers",
        int,
        1,
        "local worker processes on one shared study (default storage: OUT_DIR/journal.log)",
    ),
    ("heartbeat_interval", float, 10.0, "seconds between the heartbeats of a running trial"),
    (
        "grace_period",
        float | None,
        None,
        "seconds without heartbeat before a trial counts as lost and runs again "
        "(default 4 x heartbeat_interval)",
    ),
]


def _search_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from autonorm._lightning import (
        datamodule_bases,
        default_namespace,
        lightning_module_bases,
    )

    parser = ArgumentParser(
        prog="autonorm search",
        description="Search the per-slot normalization config of a LightningModule with Optuna.",
        exit_on_error=False,
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML file with any of the options"
    )
    # a module of either Lightning namespace; the Trainer's arguments are the same in both
    parser.add_subclass_arguments(
        lightning_module_bases(), "model", required=True, instantiate=False
    )
    parser.add_subclass_arguments(datamodule_bases(), "data", required=True, instantiate=False)
    parser.add_class_arguments(
        default_namespace().Trainer,
        "trainer",
        instantiate=False,
        fail_untyped=False,
        skip={"callbacks", "logger", "plugins", "strategy", "profiler"},
    )
    for name, kind, default, text in _SEARCH_OPTIONS:
        parser.add_argument(f"--search.{name}", type=kind, default=default, help=text)
    return parser


def _factory(spec: Any, what: str) -> Callable[[], Any]:
    class_path = spec["class_path"] if isinstance(spec, dict) else spec.class_path
    init_args = (
        spec.get("init_args") if isinstance(spec, dict) else getattr(spec, "init_args", None)
    )
    cls = import_class(class_path, what)
    kwargs = (
        dict(vars(init_args))
        if init_args is not None and not isinstance(init_args, dict)
        else dict(init_args or {})
    )
    return functools.partial(cls, **kwargs)  # keeps the class: its Lightning namespace


def run_search(argv: Sequence[str], *, debug: bool = False) -> int:
    from jsonargparse import ArgumentError

    from autonorm.budget import as_budget
    from autonorm.search import (
        SearchProgress,
        TrialLines,
        default_study_name,
        given_storage,
        make_sampler,
        pool_position,
        search,
    )
    from autonorm.search_spaces import resolve_space

    sys.path.insert(0, os.getcwd())  # user modules next to the command, as LightningCLI does
    parser = _search_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except (ArgumentError, SystemExit) as err:
        if isinstance(err, SystemExit):
            return int(err.code or 0)
        raise UsageError(_parse_error_summary(str(err))) from None
    options = cfg.search
    options.storage = given_storage(options.storage)
    if options.n_trials is not None and options.n_trials < 1:
        raise UsageError(f"--search.n_trials must be a positive int, got {options.n_trials}")
    if options.n_workers < 1:
        raise UsageError(f"--search.n_workers must be a positive int, got {options.n_workers}")
    budget_opts = {k: v for k, v in vars(options.budget).items() if v is not None}
    budget = as_budget(budget_opts or None)
    space = resolve_space(options.space)
    if options.choices:
        space = dataclasses.replace(space, choices={"*": _choices(options.choices)})
    if options.weight_norms:
        space = dataclasses.replace(space, weight_norms=True)
    trainer_kwargs = _trainer_defaults(
        {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    )
    model_factory = _factory(cfg.model, "model")
    data_factory = _factory(cfg.data, "data")
    study_name = options.study_name or default_study_name(_class_name(cfg.model))
    if options.n_workers > 1:
        retrain = _retrainer(
            model_factory, data_factory, budget, trainer_kwargs, options, study_name
        )
        return _run_pool(argv, options, study_name, debug=debug, retrain=retrain)

    position = pool_position()
    sampler: Any = options.sampler
    if position is not None and options.seed is not None and sampler in ("tpe", "random"):
        sampler = make_sampler(sampler, options.seed + position[0])  # no two workers alike
    kwargs = dict(
        n_trials=options.n_trials,
        timeout=options.timeout,
        space=space,
        budget=budget,
        monitor=options.monitor,
        mode=options.mode,
        trainer_kwargs=trainer_kwargs,
        storage=options.storage,
        study_name=study_name,
        out_dir=options.out_dir,
        sampler=sampler,
        pruner=options.pruner,
        seed=options.seed,
        warm_start=options.warm_start,
        objectives=options.objectives,
        retrain=options.retrain,
        verbose=options.verbose,
        heartbeat_interval=options.heartbeat_interval,
        grace_period=options.grace_period,
    )
    if position is not None:  # a worker of `--search.n_workers`: its parent writes the bundle
        index, count = position
        prefix = f"worker {index}/{count} (pid {os.getpid()})"
        search(model_factory, data_factory, callbacks=[TrialLines(prefix)], export=False, **kwargs)
        print(f"{prefix}: done", file=sys.stderr, flush=True)
        return 0
    progress = SearchProgress(options.n_trials)
    with progress:
        result = search(model_factory, data_factory, callbacks=[progress], **kwargs)
    print_result(console(), result)
    return 0


def _choices(given: str | list[str]) -> list[str]:
    """``--search.choices``: one name or label, or a list of them; an unknown one is a usage
    error that names it and the valid names."""
    from autonorm.config import NormChoice

    choices = [given] if isinstance(given, str) else list(given)
    for choice in choices:
        try:
            NormChoice.parse(choice)
        except ValueError as err:
            raise UsageError(f"--search.choices: {err}") from None
    return choices


def _class_name(spec: Any) -> str:
    class_path = spec["class_path"] if isinstance(spec, dict) else spec.class_path
    return class_path.rsplit(".", 1)[-1]


def _run_pool(
    argv: Sequence[str],
    options: Any,
    study_name: str,
    *,
    debug: bool,
    retrain: Callable[[Any], Path] | None,
) -> int:
    """``--search.n_workers K``: the pool runs the workers and writes the bundle; print it."""
    from autonorm.search import default_out_dir, log_tail, run_pool, worker_command

    out = console()
    outcome = run_pool(
        worker_command(argv, debug=debug),
        n_workers=options.n_workers,
        n_trials=options.n_trials,
        study_name=study_name,
        out=Path(options.out_dir) if options.out_dir else default_out_dir(study_name),
        storage=options.storage,
        retrain=retrain,
        say=out.print,
    )
    if outcome.result is not None:
        print_result(out, outcome.result)
    else:
        out.print(f"no finished trial in study {study_name!r}: no bundle written")
    for worker in outcome.failed:
        lines = log_tail(worker.log_path, 20)
        errors = [line for line in lines if line.startswith("autonorm:")] or lines[-4:]
        print(
            f"autonorm: worker {worker.index} exited {worker.returncode} (log {worker.log_path})",
            file=sys.stderr,
        )
        for line in errors[-3:]:
            print(f"  {mask_password(line)}", file=sys.stderr)
    return outcome.exit_code


def _retrainer(
    model_factory: Callable[[], Any],
    data_factory: Callable[[], Any],
    budget: Any,
    trainer_kwargs: dict[str, Any],
    options: Any,
    study_name: str,
) -> Callable[[Any], Path] | None:
    """``--search.retrain`` of a pool: the parent trains the best config once all workers end."""
    if not options.retrain:
        return None
    from autonorm.search import default_out_dir

    out = Path(options.out_dir) if options.out_dir else default_out_dir(study_name)

    def retrain(config: Any) -> Path:
        from autonorm.search import retrain_best

        return retrain_best(
            config,
            model_factory,
            data_factory,
            budget=budget,
            trainer_kwargs=trainer_kwargs,
            out_dir=out,
            seed=options.seed,
        )

    return retrain


def _import_problem(class_path: str) -> str | None:
    """Why ``class_path`` cannot be imported, or None when it can."""
    module, _, name = class_path.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except Exception as err:  # ImportError, AttributeError, errors raised by the module itself
        return f"{type(err).__name__}: {err}"
    return None


def _parse_error_summary(text: str) -> str:
    """One line from jsonargparse's nested message: the class path that failed and why."""
    lines = [line.strip(" -") for line in text.splitlines() if line.strip(" -")]
    key = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    for i, line in enumerate(lines):
        found = re.match(r"Problem with given class_path '([^']+)'", line)
        if found and key:
            cause = lines[i + 1] if i + 1 < len(lines) else "cannot be imported"
            return (
                f"cannot import --{key.group(1)} class {found.group(1)!r} ({cause}); give a dotted "
                "path importable from the working directory or PYTHONPATH"
            )
        not_a_class = re.match(r"Expected a path but (\S+) either not accessible or invalid", line)
        if not_a_class and key:
            problem = _import_problem(not_a_class.group(1))
            if problem is not None:
                return (
                    f"cannot import --{key.group(1)} class {not_a_class.group(1)!r} ({problem}); "
                    "give a dotted path importable from the working directory or PYTHONPATH"
                )
            # imported, but no subclass of either namespace's base class
            base = "LightningDataModule" if key.group(1) == "data" else "LightningModule"
            return (
                f"--{key.group(1)} {not_a_class.group(1)} is neither a {base} (of "
                "lightning.pytorch or pytorch_lightning) nor a config file"
            )
    if key and len(lines) > 1:
        return f"--{key.group(1)}: {lines[1]}"
    return lines[0] if lines else "invalid arguments"


def _trainer_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """Drop the Trainer signature's own defaults so that search() applies its trial defaults."""
    import inspect

    from autonorm._lightning import default_namespace

    trainer = default_namespace().Trainer
    defaults = {
        name: p.default for name, p in inspect.signature(trainer.__init__).parameters.items()
    }
    return {k: v for k, v in given.items() if k not in defaults or defaults[k] != v}
