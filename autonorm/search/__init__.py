"""``autonorm.search``: the per-slot Optuna search, and the package that runs it.

Modules, top to bottom: ``runner`` (:func:`search`: the orchestration), ``settings`` (the
arguments, validated once), ``warm_start`` (the first trials), ``training`` (a trial, the learn
pass, retraining), ``loop`` and ``workers`` (several processes on one study), ``pool`` (the
CLI's local worker pool), ``storage`` (storages, samplers, pruners), ``export`` (the bundle),
``progress`` (the live display).

The package is callable: ``autonorm.search(Net, Data(), ...)`` runs :func:`search`, whether
``autonorm.search`` names this package (after ``import autonorm.search``) or the function.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from autonorm.search.export import SearchResult, export_bundle
from autonorm.search.runner import search
from autonorm.search.settings import SearchSettings
from autonorm.search.storage import make_storage
from autonorm.search.training import retrain_best

__all__ = [
    "SearchResult",
    "SearchSettings",
    "export_bundle",
    "make_storage",
    "retrain_best",
    "search",
]

#: ``inspect.signature(autonorm.search)`` and ``help`` show the function's.
__wrapped__ = search


class _CallableModule(types.ModuleType):
    """Importing the package binds ``autonorm.search`` to it, over the function of the same
    public name: calling the package calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> SearchResult:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
