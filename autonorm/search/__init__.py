"""``autonorm.search``: running a search. How the trials are chosen, trained, stored and exported.

What belongs here is the search's process: what a *run* does with a study. What a slot may
become (presets, user spaces, tying, a config or learned weights in terms of a space) belongs
to :mod:`autonorm.search_spaces`, which this package reads.

Modules, top to bottom: ``_runner`` (:func:`search`: the orchestration), ``_settings``
(:class:`SearchSettings`: every argument declared once, feeding ``search()``'s signature and the
CLI), ``_plan`` (the staged plan: screen, promote, refine, confirm, and the evidence it reads),
``_planned`` (what it stores on a trial, read back as a :class:`~autonorm.callbacks.TrialTask`),
``_warm_start`` (the first trials), ``_training`` (a
trial, the learn pass, retraining), ``_loop`` and ``_workers`` (several processes on one study),
``_pool`` (the CLI's local worker pool), ``_storage`` (storages, samplers, pruners), ``_export``
(the bundle), ``_progress`` (the live display, or plain lines off a terminal).

The package is callable: ``autonorm.search(Net, Data(), ...)`` runs :func:`search`, whether
``autonorm.search`` names this package (after ``import autonorm.search``) or the function.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from autonorm.search._export import (
    BEST_CONFIG_FILE,
    PARETO_FILE,
    REPORT_FILE,
    STORAGE_FILE,
    SearchResult,
    bundle_storage,
    export_bundle,
)
from autonorm.search._pool import log_tail, run_pool, worker_command
from autonorm.search._progress import SearchProgress, TrialLines
from autonorm.search._ranks import RankFailed, RankLost, gpus_per_training, is_follower
from autonorm.search._runner import search
from autonorm.search._settings import SearchSettings, cli_fields, default_out_dir
from autonorm.search._storage import SQLITE_FILE, make_sampler, make_storage
from autonorm.search._training import LEARN_MIXING_LR_SCALE, retrain_best
from autonorm.search._workers import given_storage, handle_interrupts, pool_position

__all__ = [
    "BEST_CONFIG_FILE",
    "LEARN_MIXING_LR_SCALE",
    "PARETO_FILE",
    "REPORT_FILE",
    "RankFailed",
    "RankLost",
    "SQLITE_FILE",
    "STORAGE_FILE",
    "SearchProgress",
    "SearchResult",
    "SearchSettings",
    "TrialLines",
    "bundle_storage",
    "cli_fields",
    "default_out_dir",
    "export_bundle",
    "given_storage",
    "gpus_per_training",
    "handle_interrupts",
    "is_follower",
    "log_tail",
    "make_sampler",
    "make_storage",
    "pool_position",
    "retrain_best",
    "run_pool",
    "search",
    "worker_command",
]

#: ``inspect.signature(autonorm.search)`` and ``help`` show the function's.
__wrapped__ = search


class _CallableModule(types.ModuleType):
    """Importing the package binds ``autonorm.search`` to it, over the function of the same
    public name: calling the package calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> SearchResult:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
