"""Apply a saved per-slot config for a final training."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn
from typing_extensions import Unpack, override

from autonorm.callbacks._rewrite import AutoNorm, RewriteOptions
from autonorm.config import NormConfig
from autonorm.surgery import Slot, apply_config

if TYPE_CHECKING:
    from pytorch_lightning import Trainer


class FixedNorms(AutoNorm, mode="fixed"):
    """Rewrite every slot as a given config says, e.g. a search's ``best_config.yaml``.

    Args:
        config: a :class:`~autonorm.NormConfig`, its ``{slot name: choice}`` mapping (as
            :func:`~autonorm.apply_config` takes) or a path to a config file.
        check_model: refuse a config recorded for another model class (its metadata
            ``model_class``); False applies it anyway.
        **options: ``include``, ``exclude``, ``example_input``, ``config_path``,
            ``record_metrics``, ``budget``: as :class:`~autonorm.callbacks.AutoNorm`. With ``include``/``exclude`` the config may
            name only the selected slots; the others keep their layers.

    Raises:
        ValueError: ``config`` is neither a NormConfig, a mapping nor a path.
    """

    def __init__(
        self,
        config: NormConfig | Mapping[str, Any] | str | os.PathLike[str],
        *,
        check_model: bool = True,
        **options: Unpack[RewriteOptions],
    ) -> None:
        super().__init__(**options)
        loaded = NormConfig.load(config) if isinstance(config, (str, os.PathLike)) else config
        if isinstance(loaded, Mapping):
            loaded = NormConfig(loaded)
        if not isinstance(loaded, NormConfig):
            raise ValueError(
                f"`config` must be a NormConfig, a mapping or a path, got {type(config).__name__}"
            )
        self.config: NormConfig | None = loaded
        self.check_model = check_model

    @override
    def _rewrite(
        self, trainer: Trainer, pl_module: nn.Module, found: list[Slot], example: Any
    ) -> None:
        assert self.config is not None
        apply_config(
            pl_module,
            self.config,
            partial=self.selective,
            example_input=example,
            slots=found,
            check_model=self.check_model,
        )
