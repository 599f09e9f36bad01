"""The user's own classes, named on the command line by dotted path."""

from __future__ import annotations

import importlib

from autonorm._errors import UsageError


def import_class(class_path: str, what: str) -> type:

    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UsageError(
            f"cannot import {what} class {class_path!r} ({err}); give a dotted path importable "
            "from the working directory or PYTHONPATH"
        ) from None
