"""Apply a saved per-slot config for a final training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from typing_extensions import override

from autonorm.budget import Budget
from autonorm.callbacks._rewrite import AutoNorm
from autonorm.config import NormConfig
from autonorm.surgery import Slot, apply_config


class FixedNorms(AutoNorm, mode="fixed"):
    """Rewrite every slot as a given config says, e.g. a search's ``best_config.yaml``.

    Args:
        config: a :class:`~autonorm.NormConfig` or a path to one.
        check_model: refuse a config recorded for another model class (its metadata
            ``model_class``); False applies it anyway.
        include, exclude, example_input, config_path, record_metrics, budget: as
            :class:`~autonorm.callbacks.AutoNorm`. With ``include``/``exclude`` the config may
            name only the selected slots; the others keep their layers.

    Raises:
        ValueError: ``config`` is neither a NormConfig nor a path.
    """

    def __init__(
        self,
        config: NormConfig | str | os.PathLike[str],
        *,
        check_model: bool = True,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        example_input: Any = None,
        config_path: str | os.PathLike[str] | None = None,
        record_metrics: bool = True,
        budget: Budget | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            include=include,
            exclude=exclude,
            example_input=example_input,
            config_path=config_path,
            record_metrics=record_metrics,
            budget=budget,
        )
        loaded = NormConfig.load(config) if isinstance(config, (str, os.PathLike)) else config
        if not isinstance(loaded, NormConfig):
            raise ValueError(
                f"`config` must be a NormConfig or a path, got {type(config).__name__}"
            )
        self.config: NormConfig | None = loaded
        self.check_model = check_model

    @override
    def _rewrite(self, trainer: Any, pl_module: nn.Module, found: list[Slot], example: Any) -> None:
        assert self.config is not None
        apply_config(
            pl_module,
            self.config,
            partial=self.include is not None or self.exclude is not None,
            example_input=example,
            slots=found,
            check_model=self.check_model,
        )
