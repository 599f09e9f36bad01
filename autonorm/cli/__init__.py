"""The ``autonorm`` command: ``search``, ``report``, ``show``, ``recommend``, ``export``,
``dashboard``.

``autonorm search`` follows LightningCLI conventions (jsonargparse): ``--model`` / ``--data`` take
a class path, ``--model.<arg>`` / ``--data.<arg>`` their init arguments, ``--trainer.<arg>`` the
Trainer's, ``--config FILE`` reads everything from YAML and ``--print_config`` prints it; search
options live under ``--search.*``. Exit codes: 0 success, 2 bad input (one line saying what to
fix), 3 the search ran but no trial met the budget (no best config), 1 any other failure,
130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM (the running trial is marked FAIL and the
bundle written first); ``--debug`` shows tracebacks.

Several ``autonorm search`` processes given the same ``--search.storage`` and
``--search.study_name`` are workers of one study (a journal file on one host, PostgreSQL across
hosts); ``--search.n_workers K`` starts K local workers and shows their combined progress.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from autonorm._errors import USAGE_ERROR
from autonorm._io import mask_password
from autonorm.cli._commands import (
    run_dashboard,
    run_export,
    run_recommend,
    run_report,
    run_show,
)
from autonorm.cli._search import run_search


def _plain_parser() -> argparse.ArgumentParser:
    from autonorm.recommendation import TASKS

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
        choices=TASKS,
        default=None,
    )
    for option, what in (("--include", "only the slots"), ("--exclude", "not the slots")):
        rec.add_argument(
            option,
            nargs="+",
            default=None,
            metavar="PATTERN",
            help=f"{what} whose name matches one of these glob patterns (as --search.{option[2:]})",
        )
    rec.add_argument("-o", "--output", default=None, help="write the config (.yaml/.json)")
    exp = sub.add_parser(
        "export", help="fold a trained model's norms and write it for inference (.pt2, ONNX)"
    )
    exp.add_argument("model", help="dotted path of the model class (nn.Module or LightningModule)")
    exp.add_argument("--checkpoint", default=None, help="a checkpoint saved with AutoNorm")
    exp.add_argument("--config", default=None, help="without --checkpoint: a config to apply")
    exp.add_argument("--model-args", default=None, help="YAML mapping of init arguments")
    exp.add_argument("--input-shape", type=int, nargs="+", default=None)
    exp.add_argument("--no-fold", action="store_true", help="write the model unfolded")
    exp.add_argument(
        "--untrained",
        action="store_true",
        help="without --checkpoint: export the model's initial weights (refused otherwise)",
    )
    exp.add_argument("-o", "--output", required=True, help="the torch.export program (.pt2)")
    exp.add_argument("--onnx", default=None, help="also write the model as ONNX to this file")
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
    "export": run_export,
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
            from autonorm.search import handle_interrupts

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
        if debug:  # the traceback too; the exit status stays the same
            traceback.print_exc()
        message = mask_password(str(err)).strip().splitlines()
        print(f"autonorm: error: {message[0] if message else type(err).__name__}", file=sys.stderr)
        for line in message[1:3]:
            print(f"  {line.strip()}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(
            f"autonorm: failed: {type(err).__name__}: {mask_password(str(err))} (run with --debug for "
            "the traceback)",
            file=sys.stderr,
        )
        return 1
