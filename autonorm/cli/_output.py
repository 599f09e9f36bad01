"""What the ``autonorm`` command prints: the console and a search's result."""

from __future__ import annotations

import re
from typing import Any

from autonorm._errors import NO_BEST_CONFIG

#: Control characters (an ANSI escape starts with one), shown as their escape instead.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain_text(value: object) -> Any:
    """User text (slot names, study names, a config's metadata) shown as written: a Rich
    ``Text``, so ``[bold]`` is not markup, with control characters as visible escapes, so an
    ANSI sequence in a file does not drive the terminal."""
    from rich.text import Text

    return Text(_CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value)))


def console() -> Any:
    from rich.console import Console

    return Console(stderr=False, soft_wrap=True)


def print_result(out: Any, result: Any) -> int:
    """The best config as a table (or the Pareto front's size) and the bundle's files; returns
    the exit status (:data:`~autonorm._errors.NO_BEST_CONFIG` when there is no answer)."""
    from rich.table import Table

    from autonorm.report import SUMMARY_FILE
    from autonorm.search import (
        BEST_CONFIG_FILE,
        PARETO_FILE,
        REPORT_FILE,
        SQLITE_FILE,
        STORAGE_FILE,
    )

    if result.best_config is not None:
        table = Table(
            title=plain_text(
                f"best config: {result.study.study_name} (value {result.best_value:.4g}, "
                f"trial {result.best_trial.number})"
            )
        )
        table.add_column("slot")
        table.add_column("choice")
        for slot, choice in result.best_config.choices.items():
            table.add_row(plain_text(slot), plain_text(choice.label))
        out.print(table)
    elif result.pareto is not None:
        out.print(f"Pareto front: {len(result.pareto)} configs ({PARETO_FILE})")
    else:
        out.print("[bold red]no trial met the budget[/]: no best config")
    out.print(plain_text(f"bundle: {result.out_dir}"))
    for name in (
        BEST_CONFIG_FILE,
        PARETO_FILE,
        REPORT_FILE,
        SUMMARY_FILE,
        SQLITE_FILE,
        STORAGE_FILE,
    ):
        if (result.out_dir / name).exists():
            out.print(plain_text(f"  {result.out_dir / name}"))
    return 0 if result.best_config is not None or result.pareto else NO_BEST_CONFIG
