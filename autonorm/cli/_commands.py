"""``autonorm report``, ``show``, ``recommend`` and ``dashboard``: commands on a study or a
config, after (or without) a search."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from autonorm._errors import AutoNormError, UsageError
from autonorm._trial_keys import STUDY_INFO
from autonorm.cli._output import console, plain_text, print_result
from autonorm.cli._user_code import find_user_modules, import_class


def _storage_of(target: str) -> tuple[Any, str | None, Path | None]:
    """(storage, study name or None, bundle folder or None) from a bundle folder or a storage."""
    from autonorm.search import bundle_storage

    path = Path(target)
    if path.is_dir():
        try:
            storage, name = bundle_storage(path)
        except AutoNormError as err:
            raise UsageError(str(err)) from None
        if "://" not in storage and not os.path.isfile(storage):  # never a new, empty journal
            raise UsageError(f"{target!r} records the journal {storage!r}, which does not exist")
        return storage, name, path
    if "://" in target or path.is_file():
        return target, None, None
    raise UsageError(f"{target!r} is neither a bundle folder, a storage URL nor a journal file")


def _load_study(storage: Any, name: str | None) -> Any:
    import optuna

    from autonorm.search import make_storage

    resolved = make_storage(storage, Path.cwd())
    names = optuna.get_all_study_names(storage=resolved)
    if name is None:
        if len(names) != 1:
            raise UsageError(f"the storage holds {len(names)} studies {names}; pass --study-name")
        name = names[0]
    if name not in names:
        raise UsageError(f"no study {name!r} in the storage; it holds {names}")
    study = optuna.load_study(study_name=name, storage=resolved)
    if STUDY_INFO not in study.user_attrs:
        raise UsageError(
            f"study {name!r} was not made by autonorm (it records no autonorm settings): "
            "nothing to report"
        )
    return study


def run_report(args: argparse.Namespace) -> int:
    from autonorm._io import safe_folder_name
    from autonorm.search import default_out_dir, export_bundle

    storage, name, folder = _storage_of(args.target)
    study = _load_study(storage, args.study_name or name)
    # the study name comes from a database others may write: one safe folder under the default
    out = args.out_dir and Path(args.out_dir)
    out = out or folder or default_out_dir(safe_folder_name(study.study_name))
    out.mkdir(parents=True, exist_ok=True)
    result = export_bundle(study, out, storage=storage)
    return print_result(console(), result)


def _model_class_and_args(args: argparse.Namespace) -> tuple[type, dict[str, Any]]:
    from autonorm._io import load_yaml

    find_user_modules()
    cls = import_class(args.model, "model")
    kwargs = load_yaml(args.model_args, "--model-args") if args.model_args else {}
    if not isinstance(kwargs, dict):
        raise UsageError(
            f"--model-args must be a YAML mapping, e.g. '{{width: 32}}', got {args.model_args!r}"
        )
    return cls, kwargs


def _example_input(args: argparse.Namespace, model: Any, *, random: bool = False) -> Any:
    """Zeros of ``--input-shape``, else the model's ``example_input_array``; ``random``:
    random values of that shape instead (a fold's check needs them)."""
    import torch

    example = (
        torch.zeros(args.input_shape)
        if args.input_shape
        else getattr(model, "example_input_array", None)
    )
    if example is None:
        raise UsageError(
            f"{type(model).__name__} has no example_input_array: give --input-shape, e.g. "
            "--input-shape 2 3 32 32"
        )
    if random and isinstance(example, torch.Tensor) and example.is_floating_point():
        example = torch.randn_like(example)
    return example


def run_recommend(args: argparse.Namespace) -> int:
    from rich.table import Table

    from autonorm.budget import Budget
    from autonorm.recommendation import recommend
    from autonorm.surgery import find_slots

    cls, kwargs = _model_class_and_args(args)
    model = cls(**kwargs)
    example = _example_input(args, model)
    budget = Budget(batch_size=args.batch_size, devices=args.devices)
    slots = find_slots(model, example, include=args.include, exclude=args.exclude)
    if not slots and (args.include or args.exclude):
        given = " ".join(
            f"--{option} {' '.join(patterns)}"
            for option, patterns in (("include", args.include), ("exclude", args.exclude))
            if patterns
        )
        raise UsageError(
            f"no slot of {cls.__name__} is selected by {given}: `autonorm recommend "
            f"{args.model}` without them lists every slot's name"
        )
    config = recommend(slots, budget, task=args.task)
    config.metadata["model_class"] = f"{cls.__module__}.{cls.__qualname__}"
    table = Table(title=f"recommended norms for {cls.__name__}")
    for column in ("slot", "choice", "why"):
        table.add_column(column)
    for name, choice in config.choices.items():
        table.add_row(name, choice.label, config.metadata["reasons"][name])
    out = console()
    out.print(table)
    if args.output:
        out.print(f"wrote {config.save(args.output)}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from autonorm.config import NormConfig

    config = NormConfig.load(args.config)
    table = Table(title=plain_text(args.config))
    table.add_column("slot")
    table.add_column("choice")
    for slot, choice in config.choices.items():
        table.add_row(plain_text(slot), plain_text(choice.label))
    out = console()
    out.print(table)
    for key, value in config.metadata.items():
        if key not in ("versions", "space", "switchable_weights"):
            out.print(plain_text(f"{key}: {value}"))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Build the model (from an AutoNorm checkpoint, else with ``--config`` applied), fold its
    norms, check the folded output and write it as a ``torch.export`` program (and ONNX)."""
    import torch
    from rich.table import Table

    from autonorm.config import NormConfig
    from autonorm.deploy import (
        FOLDS_ATTR,
        export_onnx,
        export_program,
        fold_norms,
        onnx_difference,
        plan_folds,
    )
    from autonorm.surgery import apply_config

    if not str(args.output).endswith(".pt2"):
        raise UsageError(f"-o/--output must be a .pt2 file, got {args.output!r}")
    cls, kwargs = _model_class_and_args(args)
    if args.checkpoint:
        from autonorm.callbacks import load_from_checkpoint

        example = torch.randn(args.input_shape) if args.input_shape else None
        model = load_from_checkpoint(cls, args.checkpoint, example_input=example, **kwargs)
        example = _example_input(args, model, random=True)
    else:
        if not args.untrained:
            raise UsageError(
                "no --checkpoint: the model would be exported with untrained weights; give "
                "--checkpoint, or --untrained to export the initial weights anyway"
            )
        model = cls(**kwargs)
        example = _example_input(args, model, random=True)
        if args.config:
            apply_config(model, NormConfig.load(args.config), partial=True, example_input=example)
    model.eval()
    with torch.no_grad():
        expected = model(example)
    plan = plan_folds(model, example)
    if not args.no_fold:
        fold_norms(model, example, plan=plan)
        plan = getattr(model, FOLDS_ATTR)
    title = "norms kept as they are (--no-fold)" if args.no_fold else "norms folded for inference"
    table = Table(title=plain_text(f"{cls.__name__}: {title}"))
    for column in ("slot", "folded into", "kept because"):
        table.add_column(column)
    for fold in plan:
        done = fold.reason is None and not args.no_fold
        table.add_row(
            fold.slot, fold.feeder if done else "", "" if done else fold.reason or "--no-fold"
        )
    out = console()
    out.print(table)
    path = export_program(model, example, args.output)
    with torch.no_grad():
        got = torch.export.load(path).module()(example)
    error = float((got - expected).abs().max())
    out.print(f"wrote {path} (max |difference| from the unfolded model: {error:.2e})")
    if args.onnx:
        onnx_path = export_onnx(model, example, args.onnx)
        try:
            checked = f"max |difference| from the model in onnxruntime: {onnx_difference(onnx_path, model, example):.2e}"
        except ImportError:
            checked = "not checked: pip install onnxruntime"
        out.print(plain_text(f"wrote {onnx_path} ({checked})"))
    return 0


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip().lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to any interface
        return False


def run_dashboard(args: argparse.Namespace) -> int:
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError(
            "optuna-dashboard is not installed: pip install 'autonorm[dashboard]'"
        ) from None
    from optuna.artifacts import FileSystemArtifactStore

    from autonorm.search import make_storage

    storage, _, folder = _storage_of(args.target)
    store = None
    if folder is not None and (folder / "artifacts").is_dir():
        store = FileSystemArtifactStore(str(folder / "artifacts"))
    out = console()
    if not is_loopback(args.host):
        out.print(
            f"[yellow]warning:[/] the dashboard has no authentication: anyone who can reach "
            f"{args.host}:{args.port} can read, change and delete its studies; serve on "
            "127.0.0.1 and reach it through an SSH tunnel (ssh -L) instead"
        )
    out.print(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C to stop)")
    optuna_dashboard.run_server(
        make_storage(storage, Path.cwd()), host=args.host, port=args.port, artifact_store=store
    )
    return 0
