"""Both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch``.

The one place that knows them. The callback subclasses the ``Callback`` of each namespace that
is installed, so that a Trainer from either accepts it; a search trains with the Trainer of the
namespace its LightningModule comes from (:func:`namespace_of`). Either package alone, or both,
will do. Also the two memory helpers the trial runner and the callbacks share (Lightning's own
out-of-memory test and CUDA cache release, in either namespace).
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import random
from typing import Any

import torch

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
#: What to install when neither namespace is there.
INSTALL_HINT = "pip install 'autonorm[lightning]' (or pytorch-lightning)"


def import_optional(name: str) -> Any:
    """The module ``name``, or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def installed_namespaces() -> list[Any]:
    """The Lightning packages that import here."""
    return [mod for mod in (import_optional(name) for name in NAMESPACES) if mod is not None]


def default_namespace() -> Any:
    """The Lightning package used where no LightningModule says which: ``pytorch_lightning``
    when installed, else ``lightning.pytorch``.

    Raises:
        ImportError: neither is installed.
    """
    installed = installed_namespaces()
    if not installed:
        raise ImportError(f"autonorm needs PyTorch Lightning: {INSTALL_HINT}")
    return installed[0]


def _namespace_name(cls: type) -> str | None:
    """The namespace whose ``LightningModule`` or ``LightningDataModule`` ``cls`` subclasses."""
    for klass in cls.__mro__:
        if klass.__name__ in ("LightningModule", "LightningDataModule"):
            for name in NAMESPACES:
                if klass.__module__.startswith(f"{name}."):
                    return name
    return None


def namespace_of(model: Any) -> Any:
    """The Lightning package of ``model``'s class (a LightningModule or LightningDataModule,
    its class, or a ``functools.partial`` of the class); :func:`default_namespace` for anything
    else (a plain factory, an nn.Module)."""
    while isinstance(model, functools.partial):
        model = model.func
    name = _namespace_name(model if isinstance(model, type) else type(model))
    return importlib.import_module(name) if name is not None else default_namespace()


def submodule(namespace: Any, path: str) -> Any:
    """``namespace``'s module ``path``, e.g. ``submodule(pl, "utilities.memory")``."""
    return importlib.import_module(f"{namespace.__name__}.{path}")


def lightning_module_bases() -> tuple[type, ...]:
    """``LightningModule`` of every installed namespace (what a model class may subclass)."""
    return tuple(mod.LightningModule for mod in installed_namespaces())


def datamodule_bases() -> tuple[type, ...]:
    """``LightningDataModule`` of every installed namespace."""
    return tuple(mod.LightningDataModule for mod in installed_namespaces())


def callback_bases() -> tuple[type, ...]:
    """``Callback`` of every installed namespace (what autonorm's callbacks subclass).

    Raises:
        ImportError: neither namespace is installed.
    """
    bases = tuple(mod.Callback for mod in installed_namespaces())
    if not bases:
        raise ImportError(f"autonorm.callbacks needs PyTorch Lightning: {INSTALL_HINT}")
    return bases


def is_oom_error(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error (CUDA, cuDNN or CPU allocator)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    memory = submodule(default_namespace(), "utilities.memory")  # same test in both namespaces
    return isinstance(error, RuntimeError) and memory.is_oom_error(error)


def free_memory() -> None:
    """Release what a failed trial left: Python garbage and the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        submodule(default_namespace(), "utilities.memory").garbage_collection_cuda()


def reseed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device's) with ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return
    numpy.random.seed(seed % 2**32)


def is_global_zero(trainer: Any) -> bool:
    """Whether this process is rank 0 (the one that talks to the trial)."""
    return bool(getattr(trainer, "is_global_zero", True))


def world_size(trainer: Any) -> int:
    """How many processes train together (1 outside a distributed strategy)."""
    return int(getattr(trainer, "world_size", 1) or 1)


def reduce_over_ranks(trainer: Any, values: list[float], op: str = "sum") -> list[float]:
    """Element-wise ``"sum"`` or ``"max"`` of ``values`` over the ranks (``values`` itself in
    one process); a collective: every rank calls it."""
    if world_size(trainer) <= 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def broadcast(trainer: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process)."""
    strategy = getattr(trainer, "strategy", None)
    if world_size(trainer) > 1 and strategy is not None:
        return strategy.broadcast(value, src=0)
    return value


class quiet_lightning:
    """Silence Lightning's per-trial info logs (GPU available, ...) unless verbose."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.saved: dict[str, int] = {}

    def __enter__(self) -> None:
        if self.active:
            for name in (*NAMESPACES, "lightning_fabric", "lightning.fabric", "lightning"):
                logger = logging.getLogger(name)
                self.saved[name] = logger.level
                logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)
