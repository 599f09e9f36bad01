"""MkDocs hook: the CLI reference, generated from the parsers at build time.

A page holding the marker line ``<!-- cli-reference -->`` gets, in its place, one section per
subcommand of ``autonorm`` (in the parser's order): a ``## autonorm <command>`` heading and the
command's ``--help`` text. ``autonorm search`` is a jsonargparse parser of its own
(:func:`autonorm.cli._search._search_parser`); the other commands are argparse subparsers of
:func:`autonorm.cli._plain_parser`. ``COLUMNS`` is fixed so the text wraps the same everywhere.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-reference -->"
COLUMNS = "100"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_texts() -> list[tuple[str, str]]:
    """``[(command, help text), ...]`` in the order the parser declares the commands."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        from autonorm.cli import _plain_parser
        from autonorm.cli._search import _search_parser

        texts = []
        for name, sub in _subcommands(_plain_parser()).items():
            parser = _search_parser() if name == "search" else sub
            texts.append((name, parser.format_help()))
        return texts
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _section(name: str, text: str) -> str:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    body = "\n".join(lines)
    return f"## autonorm {name}\n\n```text\n{body}\n```\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    sections = "\n".join(_section(name, text) for name, text in _help_texts())
    return (
        "\n".join(sections if line.strip() == MARKER else line for line in markdown.splitlines())
        + "\n"
    )
