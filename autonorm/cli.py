"""The ``autonorm`` command: ``search``, ``report``, ``show``, ``dashboard``.

``autonorm search`` follows LightningCLI conventions (jsonargparse): ``--model`` / ``--data`` take
a class path, ``--model.<arg>`` / ``--data.<arg>`` their init arguments, ``--trainer.<arg>`` the
Trainer's, ``--config FILE`` reads everything from YAML and ``--print_config`` prints it; search
options live under ``--search.*``. Exit codes: 0 success, 2 bad input (one line saying what to
fix), 1 any other failure; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autonorm._errors import AutoNormError

USAGE_ERROR = 2

log = logging.getLogger(__name__)


class UsageError(AutoNormError):
    """Bad command-line input."""


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False, soft_wrap=True)


# -- search -----------------------------------------------------------------------------------


def _search_parser() -> Any:
    import pytorch_lightning as pl
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="autonorm search",
        description="Search the per-slot normalization config of a LightningModule with Optuna.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options")
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True, instantiate=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True, instantiate=False)
    parser.add_class_arguments(
        pl.Trainer, "trainer", instantiate=False, fail_untyped=False,
        skip={"callbacks", "logger", "plugins", "strategy", "profiler"},
    )
    group = "search"
    parser.add_argument(f"--{group}.n_trials", type=int, default=20, help="total finished trials")
    parser.add_argument(f"--{group}.timeout", type=float | None, default=None, help="seconds")
    parser.add_argument(f"--{group}.space", type=str, default="auto", help="preset name or YAML file")
    parser.add_argument(
        f"--{group}.choices", type=list[str] | None, default=None,
        help="restrict every slot to these norm names, e.g. [batchnorm,groupnorm,layernorm]",
    )
    parser.add_argument(f"--{group}.budget.max_memory", type=str | None, default=None, help="e.g. 8GiB")
    parser.add_argument(f"--{group}.budget.batch_size", type=int | None, default=None)
    parser.add_argument(f"--{group}.budget.max_params", type=int | None, default=None)
    parser.add_argument(f"--{group}.monitor", type=str, default="val_loss")
    parser.add_argument(f"--{group}.mode", type=str, default="min", help="min or max")
    parser.add_argument(f"--{group}.storage", type=str | None, default=None, help="SQLAlchemy URL or journal file")
    parser.add_argument(f"--{group}.study_name", type=str | None, default=None)
    parser.add_argument(f"--{group}.out_dir", type=str | None, default=None)
    parser.add_argument(f"--{group}.sampler", type=str, default="tpe", help="tpe or random")
    parser.add_argument(f"--{group}.pruner", type=str, default="median", help="median, hyperband or none")
    parser.add_argument(f"--{group}.seed", type=int | None, default=None)
    parser.add_argument(f"--{group}.warm_start", type=bool, default=True)
    parser.add_argument(f"--{group}.objectives", type=list[str] | None, default=None, help="e.g. [metric,peak_memory]")
    parser.add_argument(f"--{group}.retrain", type=bool, default=False)
    parser.add_argument(f"--{group}.verbose", type=bool, default=False, help="per-trial progress bars")
    return parser


def _import_class(class_path: str, what: str) -> type:
    import importlib

    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UsageError(
            f"cannot import {what} class {class_path!r} ({err}); give a dotted path importable "
            "from the working directory or PYTHONPATH"
        ) from None


def _factory(spec: Any, what: str) -> Callable[[], Any]:
    class_path = spec["class_path"] if isinstance(spec, dict) else spec.class_path
    init_args = spec.get("init_args") if isinstance(spec, dict) else getattr(spec, "init_args", None)
    cls = _import_class(class_path, what)
    kwargs = dict(vars(init_args)) if init_args is not None and not isinstance(init_args, dict) else dict(init_args or {})
    return lambda: cls(**kwargs)


def run_search(argv: Sequence[str]) -> int:
    from jsonargparse import ArgumentError

    from autonorm.budget import Budget
    from autonorm.progress import SearchProgress
    from autonorm.study import search
    from autonorm.search_spaces import SearchSpace, resolve_space

    sys.path.insert(0, os.getcwd())  # user modules next to the command, as LightningCLI does
    parser = _search_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except (ArgumentError, SystemExit) as err:
        if isinstance(err, SystemExit):
            return int(err.code or 0)
        raise UsageError(_parse_error_summary(str(err))) from None
    options = cfg.search
    if options.n_trials < 1:
        raise UsageError(f"--search.n_trials must be a positive int, got {options.n_trials}")
    budget_opts = {k: v for k, v in vars(options.budget).items() if v is not None}
    budget = Budget(**budget_opts) if budget_opts else None
    space = resolve_space(options.space)
    if options.choices:
        space = SearchSpace(space.preset, rules={"*": list(options.choices)}, identity=space.identity, tie=space.tie)
    trainer_kwargs = {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    model_factory = _factory(cfg.model, "model")
    data_factory = _factory(cfg.data, "data")
    console = _console()
    progress = SearchProgress(options.n_trials)
    with progress:
        result = search(
            model_factory,
            data_factory,
            n_trials=options.n_trials,
            timeout=options.timeout,
            space=space,
            budget=budget,
            monitor=options.monitor,
            mode=options.mode,
            trainer_kwargs=_trainer_defaults(trainer_kwargs),
            storage=options.storage,
            study_name=options.study_name or f"autonorm-{cfg.model['class_path'].rsplit('.', 1)[-1] if isinstance(cfg.model, dict) else cfg.model.class_path.rsplit('.', 1)[-1]}",
            out_dir=options.out_dir,
            sampler=options.sampler,
            pruner=options.pruner,
            seed=options.seed,
            warm_start=options.warm_start,
            objectives=options.objectives,
            retrain=options.retrain,
            verbose=options.verbose,
            callbacks=[progress],
        )
    _print_result(console, result)
    return 0


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
    if key and len(lines) > 1:
        return f"--{key.group(1)}: {lines[1]}"
    return lines[0] if lines else "invalid arguments"


def _trainer_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """Drop the Trainer signature's own defaults so that search() applies its trial defaults."""
    import inspect

    import pytorch_lightning as pl

    defaults = {
        name: p.default for name, p in inspect.signature(pl.Trainer.__init__).parameters.items()
    }
    return {k: v for k, v in given.items() if k not in defaults or defaults[k] != v}


def _print_result(console: Any, result: Any) -> None:
    from rich.table import Table

    if result.best_config is not None:
        table = Table(title=f"best config: {result.study.study_name} (value {result.best_value:.4g}, trial {result.best_trial.number})")
        table.add_column("slot")
        table.add_column("choice")
        for slot, choice in result.best_config.choices.items():
            table.add_row(slot, choice.label)
        console.print(table)
    elif result.pareto is not None:
        console.print(f"Pareto front: {len(result.pareto)} configs (pareto.yaml)")
    else:
        console.print("[bold red]no trial met the budget[/]: no best config")
    console.print(f"bundle: {result.out_dir}")
    for name in ("best_config.yaml", "pareto.yaml", "report.html", "summary.json", "study.db", "storage.txt"):
        if (result.out_dir / name).exists():
            console.print(f"  {result.out_dir / name}")


# -- report, show, dashboard ------------------------------------------------------------------


def _storage_of(target: str) -> tuple[Any, str | None, Path | None]:
    """(storage, study name or None, bundle folder or None) from a bundle folder or a storage."""
    path = Path(target)
    if path.is_dir():
        if (path / "study.db").is_file():
            return f"sqlite:///{(path / 'study.db').resolve()}", None, path
        if (path / "storage.txt").is_file():
            lines = (path / "storage.txt").read_text().splitlines()
            name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("study_name:")), None)
            if "***" in lines[0]:
                raise UsageError(
                    f"{target}/storage.txt names a storage with a masked password; pass the storage URL"
                )
            return lines[0], name, path
        raise UsageError(f"{target!r} holds neither study.db nor storage.txt: not an autonorm bundle")
    if "://" in target or path.is_file():
        return target, None, None
    raise UsageError(f"{target!r} is neither a bundle folder, a storage URL nor a journal file")


def _load_study(storage: Any, name: str | None) -> Any:
    import optuna

    from autonorm.study import make_storage

    resolved = make_storage(storage, Path.cwd())
    names = optuna.get_all_study_names(storage=resolved)
    if name is None:
        if len(names) != 1:
            raise UsageError(f"the storage holds {len(names)} studies {names}; pass --study-name")
        name = names[0]
    if name not in names:
        raise UsageError(f"no study {name!r} in the storage; it holds {names}")
    return optuna.load_study(study_name=name, storage=resolved)


def run_report(args: argparse.Namespace) -> int:
    from autonorm.study import export_bundle

    storage, name, folder = _storage_of(args.target)
    study = _load_study(storage, args.study_name or name)
    out = Path(args.out_dir) if args.out_dir else folder or Path.cwd() / "autonorm-runs" / study.study_name
    out.mkdir(parents=True, exist_ok=True)
    result = export_bundle(study, out, storage=storage if folder is None or not str(storage).startswith("sqlite") else None)
    _print_result(_console(), result)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from autonorm.config import NormConfig

    config = NormConfig.load(args.config)
    table = Table(title=str(args.config))
    table.add_column("slot")
    table.add_column("choice")
    for slot, choice in config.choices.items():
        table.add_row(slot, choice.label)
    console = _console()
    console.print(table)
    for key, value in config.metadata.items():
        if key not in ("versions", "space", "switchable_weights"):
            console.print(f"{key}: {value}")
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError("optuna-dashboard is not installed: pip install 'autonorm[dashboard]'") from None
    from optuna.artifacts import FileSystemArtifactStore

    from autonorm.study import make_storage

    storage, _, folder = _storage_of(args.target)
    store = None
    if folder is not None and (folder / "artifacts").is_dir():
        store = FileSystemArtifactStore(str(folder / "artifacts"))
    _console().print(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C to stop)")
    optuna_dashboard.run_server(make_storage(storage, Path.cwd()), host=args.host, port=args.port, artifact_store=store)
    return 0


def _plain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autonorm", description="Choose the normalization layer of every norm slot.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("search", help="run a search (autonorm search --help)", add_help=False)
    report = sub.add_parser("report", help="(re)build report.html, summary.json and best_config.yaml from a study")
    report.add_argument("target", help="bundle folder, storage URL or journal file")
    report.add_argument("--study-name", default=None)
    report.add_argument("--out-dir", default=None)
    show = sub.add_parser("show", help="print the per-slot table of a config file")
    show.add_argument("config")
    dash = sub.add_parser("dashboard", help="open the study in optuna-dashboard")
    dash.add_argument("target", help="bundle folder, storage URL or journal file")
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=8080)
    return parser


def _drop_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = None
    record.exc_text = None
    return True


def _quiet_optuna(debug: bool) -> None:
    """Optuna's per-trial INFO lines would interleave with the live display, and a failed trial
    logs its traceback: the CLI reports the error in one line instead (``--debug`` keeps all)."""
    if debug:
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_drop_traceback)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "report": run_report,
    "show": run_show,
    "dashboard": run_dashboard,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autonorm`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_optuna(debug)
    try:
        if argv and argv[0] == "search":
            return run_search(argv[1:])
        args = _plain_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("autonorm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError) as err:  # bad input, incl. AutoNormError
        if debug:
            raise
        message = str(err).strip().splitlines()
        print(f"autonorm: error: {message[0] if message else type(err).__name__}", file=sys.stderr)
        for line in message[1:3]:
            print(f"  {line.strip()}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as err:
        if debug:
            raise
        print(f"autonorm: failed: {type(err).__name__}: {err} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
