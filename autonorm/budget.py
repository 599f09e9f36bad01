"""Budgets a search must respect: peak training memory, per-device batch size, parameters."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
#: Field metadata key (of :class:`Budget` and the search's settings): the type a command line
#: parses the field as, where the Python field is wider or holds it resolved; None: the field is
#: no command-line option.
CLI_TYPE = "cli_type"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a size string: ``"8GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"4096"``.

    Raises:
        ValueError: not a positive size, or an unknown unit.

    Example::

        >>> parse_bytes("512MiB")
        536870912
    """
    if isinstance(value, bool):
        raise ValueError(f"`max_memory` must be bytes or a size like '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`max_memory` must be > 0 bytes, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match and unit in _UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[unit])
    raise ValueError(
        f"`max_memory` must be bytes or a size like '8GiB', '512MiB', '1.5GB' "
        f"(units: {', '.join(u for u in _UNITS if u)}), got {value!r}"
    )


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def _devices(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`devices` must be a positive int, got {value!r}")
    return value


def _positive_number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"`trainings` must be a positive number, got {value!r}")
    return float(value)


#: A per-device batch of at most this many samples is small for batch statistics.
SMALL_BATCH = 8
#: A per-device batch of at least this many samples is large enough for batch statistics.
LARGE_BATCH = 16


@dataclass(frozen=True)
class Budget:
    """What every trial must fit in.

    Args:
        max_memory: peak memory of a training step, bytes or a string (``"8GiB"``). Measured with
            the CUDA allocator on GPU, estimated from a real step on CPU (parameters, gradients,
            optimizer state and the activations saved for backward).
        batch_size: the per-device batch size the model will train with; trials train at it so
            that batch-dependent norms are judged where they will be used.
        max_params: the most parameters the rewritten model may have.
        devices: how many devices the final training uses (SyncBatchNorm-aware choices).
        trainings: the compute a search may spend, in full trainings (a training is one run of
            the trials' ``max_epochs``): every epoch trained counts, pruned and screening
            epochs, a learn pass and re-evaluations included. Fractions are fine (``2.5``).

    Example::

        >>> Budget(max_memory="512MiB", batch_size=4).max_memory
        536870912
    """

    max_memory: int | None = field(default=None, metadata={CLI_TYPE: str})  # "8GiB" -> bytes
    batch_size: int | None = None
    max_params: int | None = None
    devices: int = 1
    trainings: float | None = None

    def __post_init__(self) -> None:
        problems = []
        for name, check in (
            ("max_memory", lambda v: None if v is None else parse_bytes(v)),
            ("batch_size", lambda v: _positive_int("batch_size", v)),
            ("max_params", lambda v: _positive_int("max_params", v)),
            ("devices", _devices),
            ("trainings", _positive_number),
        ):
            try:
                object.__setattr__(self, name, check(getattr(self, name)))
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("invalid budget: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (bytes as ints)."""
        return asdict(self)

    @property
    def small_batch(self) -> bool:
        """Whether the per-device batch is under :data:`LARGE_BATCH`, where batch statistics
        are unreliable (Wu & He 2018) and the small-batch family is worth a trial."""
        return self.batch_size is not None and self.batch_size < LARGE_BATCH


def as_budget(value: Budget | Mapping[str, Any] | None, what: str = "budget") -> Budget | None:
    """A :class:`Budget` from a Budget, its dict (``Budget.to_dict()`` / YAML) or None: the one
    coercion every entry point (search, callback, recommend, CLI) uses."""
    if value is None or isinstance(value, Budget):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(Budget)})
        if unknown:
            raise ValueError(
                f"`{what}` has unknown keys {unknown}; valid: {[f.name for f in fields(Budget)]}"
            )
        return Budget(**value)
    raise ValueError(f"`{what}` must be an autonorm.Budget or a dict, got {type(value).__name__}")
