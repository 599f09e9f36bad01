"""The ``autonorm`` command: ``search``, ``report``, ``show``, ``dashboard``.

``autonorm search`` follows LightningCLI conventions (jsonargparse): ``--model`` / ``--data`` take
a class path, ``--model.<arg>`` / ``--data.<arg>`` their init arguments, ``--trainer.<arg>`` the
Trainer's, ``--config FILE`` reads everything from YAML and ``--print_config`` prints it; search
options live under ``--search.*``. Exit codes: 0 success, 2 bad input (one line saying what to
fix), 1 any other failure, 130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM (the running trial
is marked FAIL and the bundle written first); ``--debug`` shows tracebacks.

Several ``autonorm search`` processes given the same ``--search.storage`` and
``--search.study_name`` are workers of one study (a journal file on one host, PostgreSQL across
hosts); ``--search.n_workers K`` starts K local workers and shows their combined progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from autonorm._errors import UsageError
from autonorm._io import mask_password

USAGE_ERROR = 2

log = logging.getLogger(__name__)


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
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML file with any of the options"
    )
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True, instantiate=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True, instantiate=False)
    parser.add_class_arguments(
        pl.Trainer,
        "trainer",
        instantiate=False,
        fail_untyped=False,
        skip={"callbacks", "logger", "plugins", "strategy", "profiler"},
    )
    group = "search"
    parser.add_argument(f"--{group}.n_trials", type=int, default=20, help="total finished trials")
    parser.add_argument(f"--{group}.timeout", type=float | None, default=None, help="seconds")
    parser.add_argument(
        f"--{group}.space", type=str, default="auto", help="preset name or YAML file"
    )
    parser.add_argument(
        f"--{group}.choices",
        type=list[str] | None,
        default=None,
        help="restrict every slot to these norm names, e.g. [batchnorm,groupnorm,layernorm]",
    )
    parser.add_argument(
        f"--{group}.budget.max_memory", type=str | None, default=None, help="e.g. 8GiB"
    )
    parser.add_argument(f"--{group}.budget.batch_size", type=int | None, default=None)
    parser.add_argument(f"--{group}.budget.max_params", type=int | None, default=None)
    parser.add_argument(
        f"--{group}.budget.devices",
        type=int | None,
        default=None,
        help="devices of the final training (more than 1 offers syncbatchnorm)",
    )
    parser.add_argument(
        f"--{group}.weight_norms",
        type=bool,
        default=False,
        help="also search +ws/+wn pairs on slots fed by a Conv/Linear",
    )
    parser.add_argument(f"--{group}.monitor", type=str, default="val_loss")
    parser.add_argument(f"--{group}.mode", type=str, default="min", help="min or max")
    parser.add_argument(
        f"--{group}.storage", type=str | None, default=None, help="SQLAlchemy URL or journal file"
    )
    parser.add_argument(f"--{group}.study_name", type=str | None, default=None)
    parser.add_argument(f"--{group}.out_dir", type=str | None, default=None)
    parser.add_argument(f"--{group}.sampler", type=str, default="tpe", help="tpe or random")
    parser.add_argument(
        f"--{group}.pruner", type=str, default="median", help="median, hyperband or none"
    )
    parser.add_argument(f"--{group}.seed", type=int | None, default=None)
    parser.add_argument(
        f"--{group}.warm_start",
        type=bool | Literal["learn"],
        default=True,
        help="true: own norms, recommended and uniform configs first; learn: also one "
        "learned-SwitchableNorm run that narrows each slot's choices",
    )
    parser.add_argument(
        f"--{group}.objectives",
        type=list[str] | None,
        default=None,
        help="e.g. [metric,peak_memory]",
    )
    parser.add_argument(f"--{group}.retrain", type=bool, default=False)
    parser.add_argument(
        f"--{group}.verbose", type=bool, default=False, help="per-trial progress bars"
    )
    parser.add_argument(
        f"--{group}.n_workers",
        type=int,
        default=1,
        help="local worker processes on one shared study (default storage: OUT_DIR/journal.log)",
    )
    parser.add_argument(
        f"--{group}.heartbeat_interval",
        type=float,
        default=10.0,
        help="seconds between the heartbeats of a running trial",
    )
    parser.add_argument(
        f"--{group}.grace_period",
        type=float | None,
        default=None,
        help="seconds without heartbeat before a trial counts as lost and runs again "
        "(default 4 x heartbeat_interval)",
    )
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
    init_args = (
        spec.get("init_args") if isinstance(spec, dict) else getattr(spec, "init_args", None)
    )
    cls = _import_class(class_path, what)
    kwargs = (
        dict(vars(init_args))
        if init_args is not None and not isinstance(init_args, dict)
        else dict(init_args or {})
    )
    return lambda: cls(**kwargs)


def run_search(argv: Sequence[str], *, debug: bool = False) -> int:
    from jsonargparse import ArgumentError

    from autonorm import workers
    from autonorm.budget import Budget
    from autonorm.progress import SearchProgress, TrialLines
    from autonorm.search_spaces import resolve_space
    from autonorm.study import make_sampler, search

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
    if options.n_workers < 1:
        raise UsageError(f"--search.n_workers must be a positive int, got {options.n_workers}")
    budget_opts = {k: v for k, v in vars(options.budget).items() if v is not None}
    budget = Budget(**budget_opts) if budget_opts else None
    space = resolve_space(options.space)
    if options.choices:
        space = dataclasses.replace(space, rules={"*": list(options.choices)})
    if options.weight_norms:
        space = dataclasses.replace(space, weight_norms=True)
    trainer_kwargs = _trainer_defaults(
        {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    )
    model_factory = _factory(cfg.model, "model")
    data_factory = _factory(cfg.data, "data")
    study_name = options.study_name or f"autonorm-{_class_name(cfg.model)}"
    if options.n_workers > 1:
        return _run_pool(
            argv,
            options,
            study_name,
            debug=debug,
            retrain=_retrainer(model_factory, data_factory, budget, trainer_kwargs, options.seed),
        )

    position = workers.pool_position()
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
    _print_result(_console(), result)
    return 0


def _class_name(spec: Any) -> str:
    class_path = spec["class_path"] if isinstance(spec, dict) else spec.class_path
    return class_path.rsplit(".", 1)[-1]


def _run_pool(
    argv: Sequence[str],
    options: Any,
    study_name: str,
    *,
    debug: bool,
    retrain: Callable[[Any, Path], Path],
) -> int:
    """``--search.n_workers K``: K worker processes of this same command on one shared study,
    one combined progress display, then the bundle written here once all of them exit."""
    import time

    import optuna

    from autonorm import workers
    from autonorm.progress import SearchProgress
    from autonorm.study import export_bundle, make_storage

    console = _console()
    out = Path(options.out_dir) if options.out_dir else Path.cwd() / "autonorm-runs" / study_name
    out.mkdir(parents=True, exist_ok=True)
    storage = options.storage
    if storage is None:
        storage = str((out / "journal.log").resolve())
        console.print(
            f"{options.n_workers} workers share the journal file {storage} "
            "(--search.storage: a PostgreSQL URL for workers on several machines)"
        )
    elif storage.startswith("sqlite"):
        console.print(
            "[yellow]warning:[/] several workers on one SQLite file wait on its locks; a journal "
            "file (--search.storage path/journal.log) or PostgreSQL serves them better"
        )
    study_storage = make_storage(storage, out)  # fails here, once, on an unusable storage
    command = [sys.executable, "-m", "autonorm.cli", *(["--debug"] if debug else []), "search"]
    command += [*argv, "--search.n_workers", "1", "--search.out_dir", str(out)]
    command += ["--search.study_name", study_name, "--search.storage", storage]
    log_dir = out / "workers"
    progress = SearchProgress(options.n_trials)
    found: list[optuna.Study] = []

    def poll(pool: list[workers.PoolWorker]) -> None:
        alive = sum(w.returncode is None for w in pool)
        try:
            if not found:
                found.append(optuna.load_study(study_name=study_name, storage=study_storage))
            progress.update(found[0], note=f"{alive} of {len(pool)} running, logs in {log_dir}")
        except KeyError:  # not created yet
            pass
        except Exception as err:  # a display must not stop the workers
            log.debug("progress poll failed: %s", err)

    started = time.time()
    with progress:
        pool, signum = workers.run_worker_pool(command, options.n_workers, log_dir, poll=poll)
    failed = [w for w in pool if w.returncode != 0]
    try:
        study = optuna.load_study(study_name=study_name, storage=study_storage)
    except KeyError:
        study = None
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    # an interrupted pool keeps a record of what it did; failed workers alone leave nothing to show
    if study is not None and (
        signum is not None or study.get_trials(deepcopy=False, states=finished)
    ):
        retrain_fn = None
        if options.retrain and not failed and signum is None:

            def retrain_fn(cfg: Any) -> Path:
                return retrain(cfg, out)

        result = export_bundle(
            study, out, storage=storage, elapsed=time.time() - started, retrain=retrain_fn
        )
        _print_result(console, result)
    else:
        console.print(f"no finished trial in study {study_name!r}: no bundle written")
    for worker in failed:
        lines = workers.log_tail(worker.log_path, 20)
        errors = [line for line in lines if line.startswith("autonorm:")] or lines[-4:]
        print(
            f"autonorm: worker {worker.index} exited {worker.returncode} (log {worker.log_path})",
            file=sys.stderr,
        )
        for line in errors[-3:]:
            print(f"  {mask_password(line)}", file=sys.stderr)
    return _pool_exit_code(signum, failed)


def _retrainer(
    model_factory: Callable[[], Any],
    data_factory: Callable[[], Any],
    budget: Any,
    trainer_kwargs: dict[str, Any],
    seed: int | None,
) -> Callable[[Any, Path], Path]:
    """``--search.retrain`` of a pool: the parent trains the best config once all workers end."""

    def retrain(config: Any, out: Path) -> Path:
        from autonorm.study import retrain_best

        return retrain_best(
            config,
            model_factory,
            data_factory,
            budget=budget,
            trainer_kwargs=trainer_kwargs,
            out_dir=out,
            seed=seed,
        )

    return retrain


def _pool_exit_code(signum: int | None, failed: list[Any]) -> int:
    if signum is not None:
        return 128 + signum
    if failed:
        return USAGE_ERROR if all(w.returncode == USAGE_ERROR for w in failed) else 1
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
        table = Table(
            title=f"best config: {result.study.study_name} (value {result.best_value:.4g}, trial {result.best_trial.number})"
        )
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
    for name in (
        "best_config.yaml",
        "pareto.yaml",
        "report.html",
        "summary.json",
        "study.db",
        "storage.txt",
    ):
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
            name = next(
                (x.split(":", 1)[1].strip() for x in lines if x.startswith("study_name:")), None
            )
            if "***" in lines[0]:
                raise UsageError(
                    f"{target}/storage.txt names a storage with a masked password; pass the storage URL"
                )
            return lines[0], name, path
        raise UsageError(
            f"{target!r} holds neither study.db nor storage.txt: not an autonorm bundle"
        )
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
    out = (
        Path(args.out_dir)
        if args.out_dir
        else folder or Path.cwd() / "autonorm-runs" / study.study_name
    )
    out.mkdir(parents=True, exist_ok=True)
    result = export_bundle(
        study,
        out,
        storage=storage if folder is None or not str(storage).startswith("sqlite") else None,
    )
    _print_result(_console(), result)
    return 0


def run_recommend(args: argparse.Namespace) -> int:
    import torch
    import yaml
    from rich.table import Table

    from autonorm.budget import Budget
    from autonorm.recommend import recommend
    from autonorm.slots import find_slots

    sys.path.insert(0, os.getcwd())
    cls = _import_class(args.model, "model")
    kwargs = yaml.safe_load(args.model_args) if args.model_args else {}
    if not isinstance(kwargs, dict):
        raise UsageError(
            f"--model-args must be a YAML mapping, e.g. '{{width: 32}}', got {args.model_args!r}"
        )
    model = cls(**kwargs)
    example = (
        torch.zeros(args.input_shape)
        if args.input_shape
        else getattr(model, "example_input_array", None)
    )
    if example is None:
        raise UsageError(
            f"{cls.__name__} has no example_input_array: give --input-shape, e.g. "
            "--input-shape 2 3 32 32"
        )
    budget = Budget(batch_size=args.batch_size, devices=args.devices)
    config = recommend(find_slots(model, example), budget, task=args.task)
    config.metadata["model_class"] = f"{cls.__module__}.{cls.__qualname__}"
    table = Table(title=f"recommended norms for {cls.__name__}")
    for column in ("slot", "choice", "why"):
        table.add_column(column)
    for name, choice in config.choices.items():
        table.add_row(name, choice.label, config.metadata["reasons"][name])
    console = _console()
    console.print(table)
    if args.output:
        console.print(f"wrote {config.save(args.output)}")
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
        raise UsageError(
            "optuna-dashboard is not installed: pip install 'autonorm[dashboard]'"
        ) from None
    from optuna.artifacts import FileSystemArtifactStore

    from autonorm.study import make_storage

    storage, _, folder = _storage_of(args.target)
    store = None
    if folder is not None and (folder / "artifacts").is_dir():
        store = FileSystemArtifactStore(str(folder / "artifacts"))
    _console().print(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C to stop)")
    optuna_dashboard.run_server(
        make_storage(storage, Path.cwd()), host=args.host, port=args.port, artifact_store=store
    )
    return 0


def _plain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autonorm", description="Choose the normalization layer of every norm slot."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("search", help="run a search (autonorm search --help)", add_help=False)
    report = sub.add_parser(
        "report", help="(re)build report.html, summary.json and best_config.yaml from a study"
    )
    report.add_argument("target", help="bundle folder, storage URL or journal file")
    report.add_argument("--study-name", default=None)
    report.add_argument("--out-dir", default=None)
    show = sub.add_parser("show", help="print the per-slot table of a config file")
    show.add_argument("config")
    rec = sub.add_parser(
        "recommend", help="a per-slot config from established practice (no training)"
    )
    rec.add_argument("model", help="dotted path of the model class (nn.Module or LightningModule)")
    rec.add_argument("--model-args", default=None, help="YAML mapping of init arguments")
    rec.add_argument("--input-shape", type=int, nargs="+", default=None)
    rec.add_argument("--batch-size", type=int, default=None, help="per-device batch size")
    rec.add_argument("--devices", type=int, default=1)
    rec.add_argument(
        "--task",
        choices=("classification", "detection", "segmentation", "generation", "style"),
        default=None,
    )
    rec.add_argument("-o", "--output", default=None, help="write the config (.yaml/.json)")
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
    "recommend": run_recommend,
    "dashboard": run_dashboard,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autonorm`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_optuna(debug)
    if not debug:  # a Lightning-internal deprecation users cannot act on, printed every trial
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        if argv and argv[0] == "search":
            from autonorm.workers import handle_interrupts

            with handle_interrupts():
                return run_search(argv[1:], debug=debug)
        args = _plain_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as err:
        name = getattr(err, "signal_name", "Ctrl-C")
        print(
            f"autonorm: interrupted by {name}; the study keeps its trials (the same command "
            "resumes it)",
            file=sys.stderr,
        )
        return getattr(err, "exit_code", 130)
    except (ValueError, FileNotFoundError, ImportError) as err:  # bad input, incl. AutoNormError
        if debug:
            raise
        message = mask_password(str(err)).strip().splitlines()
        print(f"autonorm: error: {message[0] if message else type(err).__name__}", file=sys.stderr)
        for line in message[1:3]:
            print(f"  {line.strip()}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as err:
        if debug:
            raise
        print(
            f"autonorm: failed: {type(err).__name__}: {mask_password(str(err))} (run with --debug for "
            "the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
