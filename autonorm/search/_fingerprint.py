"""What defines a search's experiment beyond its settings: the model's and the data's classes
and init arguments, and the Trainer arguments that change training. A study records it
(``experiment``); joining the study with another experiment is refused, naming what changed
(:func:`~autonorm.search._storage.check_study_settings`), so a rerun on other data never
answers with the old study's best. What cannot be told from plain values (a factory without
saved hyperparameters, the contents of dataloaders) is listed, and said once.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

#: Trainer arguments that change how a run is shown or saved, not what it trains.
COSMETIC_TRAINER_ARGS = frozenset(
    {
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "logger",
        "default_root_dir",
        "log_every_n_steps",
        "profiler",
        "max_epochs",  # a defining setting of its own
    }
)
#: Attributes every LightningDataModule has: not the user's arguments.
_DATAMODULE_INTERNALS = frozenset(
    {"trainer", "prepare_data_per_node", "allow_zero_length_dataloader_with_multiple_devices"}
)
_SCALARS = (bool, int, float, str, type(None))


class Fingerprint:
    """Plain values of what defines the experiment, and what could not be told (``missed``)."""

    def __init__(self) -> None:
        self.missed: list[str] = []

    def plain(self, value: Any, where: str) -> Any:
        """``value`` as a JSON value; an object that is none is recorded by its type only."""
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, (list, tuple)):
            return [self.plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {str(k): self.plain(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value)
        if inspect.isclass(value) or inspect.isfunction(value):
            return f"{value.__module__}.{value.__qualname__}"
        self.missed.append(f"{where} (a {type(value).__name__})")
        return f"<{type(value).__qualname__}>"

    def model(self, make_model: Callable[[], nn.Module], probe: nn.Module) -> dict[str, Any]:
        """The model's init arguments: its saved hyperparameters, else the keywords it is built
        with (``model_kwargs``, the CLI's ``--model.*``)."""
        saved = dict(getattr(probe, "hparams", None) or {})
        given = make_model.keywords if isinstance(make_model, functools.partial) else None
        if not saved and given is None:
            self.missed.append("the model's init arguments (a factory, no saved hyperparameters)")
        return {"arguments": self.plain(saved or given or {}, "model")}

    def data(
        self,
        make_datamodule: Callable[[], Any] | None,
        loaders: dict[str, Any],
        budget_batch_size: bool,
    ) -> Any:
        """The datamodule's class and arguments (saved hyperparameters, else its public plain
        attributes), or each dataloader's dataset class, size and batch size. With
        ``budget_batch_size`` the budget's batch size (a setting of its own) is left out: the
        search sets it on the user's datamodule."""
        if make_datamodule is None:
            self.missed.append("the dataloaders' contents (only their dataset class and size)")
            return {name: _loader(loader) for name, loader in loaders.items() if loader is not None}
        datamodule = make_datamodule()
        saved = dict(getattr(datamodule, "hparams", None) or {})
        if saved:
            arguments = self.plain(saved, "data")
        else:
            arguments = {
                k: v
                for k, v in vars(datamodule).items()
                if not k.startswith("_") and k not in _DATAMODULE_INTERNALS
                if isinstance(v, _SCALARS)
            }
            if not arguments:
                self.missed.append(
                    "the datamodule's arguments (no hyperparameters or plain attributes)"
                )
        if budget_batch_size and isinstance(arguments, dict):
            arguments.pop("batch_size", None)
        kind = type(datamodule)
        return {"class": f"{kind.__module__}.{kind.__qualname__}", "arguments": arguments}

    def trainer(self, trainer_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The Trainer arguments that change training; callbacks by their state key (an
        EarlyStopping's monitor and mode)."""
        out = {}
        for key, value in sorted(trainer_kwargs.items()):
            if key in COSMETIC_TRAINER_ARGS:
                continue
            if key == "callbacks":
                out[key] = self._callbacks(value)
            else:
                out[key] = self.plain(value, f"trainer.{key}")
        return out

    def _callbacks(self, given: Any) -> Any:
        if callable(given) and not hasattr(given, "setup"):
            self.missed.append("the trainer's callbacks (a factory)")
            return "<factory>"
        callbacks = list(given) if isinstance(given, (list, tuple)) else [given]
        return [str(getattr(c, "state_key", type(c).__qualname__)) for c in callbacks]


def experiment_fingerprint(
    make_model: Callable[[], nn.Module],
    probe: nn.Module,
    make_datamodule: Callable[[], Any] | None,
    loaders: dict[str, Any],
    trainer_kwargs: Mapping[str, Any],
    budget_batch_size: bool,
) -> tuple[dict[str, Any], list[str]]:
    """The experiment's record (model, data, trainer) and what it could not tell."""
    fingerprint = Fingerprint()
    record = {
        "model": fingerprint.model(make_model, probe),
        "data": fingerprint.data(make_datamodule, loaders, budget_batch_size),
        "trainer": fingerprint.trainer(trainer_kwargs),
    }
    return record, fingerprint.missed


def _loader(loader: Any) -> dict[str, Any]:
    dataset = getattr(loader, "dataset", None)
    try:
        size: int | None = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        size = None
    return {"dataset": type(dataset).__qualname__, "samples": size}


def flat_differences(old: Any, new: Any, where: str) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for each leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            inner = f"{where}.{key}" if where else str(key)
            out.extend(flat_differences(old.get(key), new.get(key), inner))
        return out
    return [] if old == new else [(where, old, new)]
