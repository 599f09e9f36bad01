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
from typing import TYPE_CHECKING, Any

from autonorm._errors import UsageError
from autonorm._io import mask_password
from autonorm.cli._output import console, print_result
from autonorm.cli._user_code import find_user_modules, import_class

if TYPE_CHECKING:
    from autonorm.search import SearchSettings

#: ``--search.<name>`` options the settings do not declare: (name, type, default, help). Each is
#: the command line's own: shorthands for the space, and the local pool of worker processes.
CLI_ONLY_OPTIONS: list[tuple[str, Any, Any, str]] = [
    (
        "choices",
        list[str] | str | None,
        None,
        "restrict every slot to these norms (names or labels), e.g. "
        "[batchnorm,groupnorm(groups=8),layernorm]",
    ),
    ("weight_norms", bool, False, "also search +ws/+wn pairs on slots fed by a Conv/Linear"),
    (
        "n_workers",
        int,
        1,
        "local worker processes on one shared study (default storage: OUT_DIR/journal.log)",
    ),
]
#: The Trainer's arguments ``--trainer.*`` does not offer, and why.
TRAINER_SKIP = {
    "callbacks": "a trial's callbacks are autonorm's (pass your own through the Python API's "
    "trainer_kwargs={'callbacks': ...})",
    "logger": "trials log to the study (its dashboard and the report), not to a logger",
    "plugins": "plugins (precision, checkpoint IO, cluster environments) are Python objects; use "
    "--trainer.precision or the Python API",
    "profiler": "a profiler would time every trial; profile one training outside the search",
}


def _search_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from autonorm._lightning import (
        datamodule_bases,
        default_namespace,
        lightning_module_bases,
    )
    from autonorm.search import cli_fields

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
        skip=set(TRAINER_SKIP),
    )
    for name, kind, default, text in [*cli_fields(), *CLI_ONLY_OPTIONS]:
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


def _check_config_files(argv: Sequence[str]) -> None:
    """Read every ``--config`` file with the strict loader first (jsonargparse's own would
    keep the last of two duplicated keys, or expand aliases).

    Raises:
        UsageError: the file's first problem, in one line.
    """
    from autonorm._errors import ConfigError
    from autonorm._io import load_yaml

    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is None:
            continue
        path = Path(value)
        try:
            if path.is_file():
                load_yaml(path.read_text(), repr(str(path)))
            else:  # jsonargparse also takes the YAML text itself
                load_yaml(value, "--config")
        except ConfigError as err:
            raise UsageError(str(err)) from None


def run_search(argv: Sequence[str], *, debug: bool = False) -> int:
    from jsonargparse import ArgumentError

    from autonorm._lightning import namespace_of
    from autonorm.search import (
        SearchProgress,
        TrialLines,
        gpus_per_training,
        is_follower,
        make_sampler,
        pool_position,
        search,
    )

    find_user_modules()  # user modules next to the command, as LightningCLI finds them
    _check_config_files(argv)
    _check_trainer_options(argv)
    parser = _search_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except (ArgumentError, SystemExit) as err:
        if isinstance(err, SystemExit):
            return int(err.code or 0)
        raise UsageError(_parse_error_summary(str(err))) from None
    if cfg.search.n_workers < 1:
        raise UsageError(f"--search.n_workers must be a positive int, got {cfg.search.n_workers}")
    settings = _settings(cfg)
    model_factory = _factory(cfg.model, "model")
    data_factory = _factory(cfg.data, "data")
    if is_follower():  # a rank of another process's trials: it trains them, then exits
        search(model_factory, data_factory, settings=settings)
        return 0
    if cfg.search.n_workers > 1:
        study_name = settings.study_name_for(_class_name(cfg.model))
        retrain = _retrainer(model_factory, data_factory, settings, study_name)
        gpus = gpus_per_training(namespace_of(model_factory), settings.trainer_kwargs)
        return _run_pool(
            argv,
            settings,
            study_name,
            cfg.search.n_workers,
            debug=debug,
            retrain=retrain,
            gpus=gpus,
        )

    position = pool_position()
    if position is None:
        progress = SearchProgress(settings.n_trials)
        with progress:
            result = search(model_factory, data_factory, settings=settings, callbacks=[progress])
        return print_result(console(), result)
    # a worker of `--search.n_workers`: its parent writes the bundle
    index, count = position
    sampler = settings.sampler
    if settings.seed is not None and isinstance(sampler, str):  # a named sampler
        sampler = make_sampler(sampler, settings.seed + index)  # no two workers alike
    prefix = f"worker {index}/{count} (pid {os.getpid()})"
    search(
        model_factory,
        data_factory,
        settings=settings,
        sampler=sampler,
        callbacks=[TrialLines(prefix)],
        export=False,
    )
    print(f"{prefix}: done", file=sys.stderr, flush=True)
    return 0


def _settings(cfg: Any) -> SearchSettings:
    """The search's settings from the parsed options: each ``--search.<field>`` as given, the
    space with ``--search.choices``/``--search.weight_norms`` applied, the study named after the
    model class, the Trainer's arguments that differ from its defaults.

    Raises:
        ValueError: a setting that does not hold (the CLI prints it in one line, exit 2).
    """
    from autonorm.search import SearchSettings, cli_fields, given_storage  # noqa: F811
    from autonorm.search_spaces import resolve_space

    options = cfg.search
    given = {
        name: getattr(options, name) for name, *_ in cli_fields() if not name.startswith("budget.")
    }
    budget = {k: v for k, v in vars(options.budget).items() if v is not None}
    space = resolve_space(options.space)
    if options.choices:
        space = dataclasses.replace(space, choices={"*": _choices(options.choices)})
    if options.weight_norms:
        space = dataclasses.replace(space, weight_norms=True)
    trainer_kwargs = _trainer_defaults(
        {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    )
    settings = SearchSettings(
        **{
            **given,
            "budget": budget or None,
            "space": space,
            "storage": given_storage(options.storage),
            "trainer_kwargs": trainer_kwargs,
        }
    )
    return settings.replace(study_name=settings.study_name_for(_class_name(cfg.model)))


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
    settings: SearchSettings,
    study_name: str,
    n_workers: int,
    *,
    debug: bool,
    retrain: Callable[[Any], Path] | None,
    gpus: int,
) -> int:
    """``--search.n_workers K``: the pool runs the workers and writes the bundle; print it.
    ``gpus``: what one training takes (0: CPU trials), each worker's own set."""
    from autonorm.search import log_tail, run_pool, worker_command

    out = console()
    outcome = run_pool(
        worker_command(argv, debug=debug),
        n_workers=n_workers,
        n_trials=settings.n_trials,
        study_name=study_name,
        out=settings.bundle_dir(study_name),
        storage=settings.storage,
        retrain=retrain,
        say=out.print,
        devices_per_worker=gpus,
    )
    answer = 0
    if outcome.result is not None:
        answer = print_result(out, outcome.result)
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
    return outcome.exit_code or answer


def _check_trainer_options(argv: Sequence[str]) -> None:
    """A ``--trainer.<arg>`` the command does not offer is refused in one line that says why.

    Raises:
        UsageError: naming the argument and the reason.
    """
    for arg in argv:
        name = arg.split("=", 1)[0].removeprefix("--trainer.")
        if arg.startswith("--trainer.") and name in TRAINER_SKIP:
            raise UsageError(f"--trainer.{name} is not taken: {TRAINER_SKIP[name]}")


def _retrainer(
    model_factory: Callable[[], Any],
    data_factory: Callable[[], Any],
    settings: SearchSettings,
    study_name: str,
) -> Callable[[Any], Path] | None:
    """``--search.retrain`` of a pool: the parent trains the best config once all workers end."""
    if not settings.retrain:
        return None

    def retrain(config: Any) -> Path:
        from autonorm.search import retrain_best

        out = settings.bundle_dir(study_name)
        return retrain_best(config, model_factory, data_factory, settings, out)

    return retrain


def _import_problem(class_path: str) -> str | None:
    """Why ``class_path`` cannot be imported, or None when it can."""
    module, _, name = class_path.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except Exception as err:  # ImportError, AttributeError, errors raised by the module itself
        return f"{type(err).__name__}: {err}"
    return None


def _union_problem(lines: list[str]) -> str:
    """``got 'maybe'; expected one of true, false, 'learn', 'learn-sparse'`` from
    jsonargparse's Union message (its subtypes and the given value)."""
    given = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("Given value:")), "")
    subtypes = next((x for x in lines if x.startswith("Subtypes:")), "")
    valid: list[str] = []
    for kind in re.findall(r"<class '(\w+)'>|Literal\[([^\]]*)\]", subtypes):
        if kind[0] == "bool":
            valid += ["true", "false"]
        elif kind[0] and kind[0] != "NoneType":
            valid.append(f"{'an' if kind[0][0] in 'aeiou' else 'a'} {kind[0]}")
        elif kind[1]:
            valid += [v.strip() for v in kind[1].split(",")]
    if "NoneType" in subtypes:
        valid.append("null")
    return f"got {given!r}; expected one of {', '.join(valid) or 'the documented values'}"


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
    if key and any("Union subtypes" in line for line in lines):
        return f"--{key.group(1)}: {_union_problem(lines)}"
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
