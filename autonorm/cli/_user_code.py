"""The user's own classes, named on the command line by dotted path."""

from __future__ import annotations

import importlib
import os
import sys

from autonorm._errors import UsageError


def find_user_modules() -> None:
    """The working directory joins the import path after the installed packages: a user's
    module next to the command is found, and a stray file there named like a library
    (``onnxscript.py``, ``plotly.py``) does not shadow it (``python -m`` puts the directory
    first: moved last)."""
    here = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", here)]
    sys.path.append(here)


def import_class(class_path: str, what: str) -> type:

    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UsageError(
            f"cannot import {what} class {class_path!r} ({err}); give a dotted path importable "
            "from the working directory or PYTHONPATH"
        ) from None
