"""Exceptions raised by autonorm."""

from __future__ import annotations


class AutoNormError(ValueError):
    """A state or input autonorm cannot work with.

    Subclasses ``ValueError`` so that callers validating input with ``except ValueError``
    also catch autonorm's own validation errors.
    """


class ConfigError(AutoNormError):
    """A :class:`~autonorm.NormConfig` that does not fit a model, or a malformed config file."""


class ProbeError(AutoNormError, RuntimeError):
    """The probe forward pass failed on the example input (a usage error: the input does not
    fit the model)."""


class UsageError(AutoNormError):
    """Bad command-line input."""


#: Exit status of the ``autonorm`` command (and of a pool worker) on bad input.
USAGE_ERROR = 2
#: Exit status of a search (or report) that ran but has no answer: no trial met the budget.
NO_BEST_CONFIG = 3
