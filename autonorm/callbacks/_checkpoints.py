"""What the AutoNorm callback puts into Lightning checkpoints, and reading it back.

A checkpoint of a rewritten model holds its layer structure (the choice that rebuilds each
slot's layer as it is) under :data:`CHECKPOINT_KEY`, so that a fresh model of the original class
can be rewritten to fit the saved weights: when resuming a fit, and in
:func:`load_from_checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from autonorm._errors import AutoNormError
from autonorm._lightning import NAMESPACES, import_optional
from autonorm.config import NormConfig
from autonorm.surgery import apply_config

#: The checkpoint entry written by the callback: ``{"structure", "config", "mode"}``.
CHECKPOINT_KEY = "autonorm"


def checkpoint_safe_globals() -> list[Any]:
    """Classes Lightning puts into checkpoints that ``torch.load(weights_only=True)`` must allow."""
    out = []
    for name in NAMESPACES:
        parsing = import_optional(f"{name}.utilities.parsing")
        if parsing is not None and hasattr(parsing, "AttributeDict"):
            out.append(parsing.AttributeDict)
    return out


def load_checkpoint(path: str | os.PathLike[str], *, lazy: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` (no arbitrary unpickling);
    ``lazy``: its tensors memory-mapped, not read (to look at its AutoNorm entry only).

    Raises:
        FileNotFoundError: no such file.
        AutoNormError: a file torch cannot read as a checkpoint, in one line (torch's own
            message runs over many).
    """
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            try:
                checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=lazy)
            except RuntimeError:
                if not lazy:
                    raise
                # an older (non-zip) file cannot be memory-mapped: read it whole
                checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AutoNormError(
            f"{os.fspath(path)!r} is not a checkpoint torch can read ({type(err).__name__}: {first})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise AutoNormError(
            f"{os.fspath(path)!r} holds a {type(checkpoint).__name__}, no checkpoint"
        )
    return checkpoint


def checkpoint_entry(
    structure: NormConfig | None,
    config: NormConfig | None,
    mode: str,
    feeders: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """The plain-valued entry the callback stores under :data:`CHECKPOINT_KEY`.

    ``feeders`` (``{slot: layer feeding it or None}``, as the probe found them) let a model
    without ``example_input_array`` get its ``+ws``/``+wn`` weights back without a probe.
    """
    return {
        "structure": None if structure is None else structure.to_dict(),
        "config": None if config is None else config.to_dict(),
        "mode": mode,
        "feeders": None if feeders is None else {str(k): v for k, v in feeders.items()},
    }


def entry_feeders(checkpoint: dict[str, Any]) -> dict[str, str | None] | None:
    """The slots' feeders recorded in a loaded checkpoint (None: not recorded)."""
    feeders = (checkpoint.get(CHECKPOINT_KEY) or {}).get("feeders")
    return dict(feeders) if isinstance(feeders, Mapping) else None


def read_entry(checkpoint: dict[str, Any]) -> tuple[NormConfig, NormConfig | None] | None:
    """``(structure, config)`` of a loaded checkpoint, or None when AutoNorm did not write it."""
    info = checkpoint.get(CHECKPOINT_KEY)
    if not info or not info.get("structure"):
        return None
    config = NormConfig.from_dict(info["config"]) if info.get("config") else None
    return NormConfig.from_dict(info["structure"]), config


def structure_from_checkpoint(
    ckpt_path: str | os.PathLike[str] | None,
) -> tuple[NormConfig, NormConfig | None] | None:
    """``(structure, config)`` saved in the checkpoint a fit resumes from, or None (no such
    file, or not written by AutoNorm)."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return None
    return read_entry(load_checkpoint(ckpt_path, lazy=True))


def load_from_checkpoint(
    model_class: type[nn.Module],
    checkpoint_path: str | os.PathLike[str],
    *,
    strict: bool = True,
    map_location: Any = None,
    example_input: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Rebuild a model trained with :class:`~autonorm.callbacks.AutoNorm` from its checkpoint.

    ``ModelClass.load_from_checkpoint`` builds the original architecture, so it fails on the
    rewritten layers' weights; this function builds the model, applies the checkpoint's layer
    structure and loads the weights strictly.

    Args:
        model_class: the LightningModule (or nn.Module) class.
        checkpoint_path: the ``.ckpt`` file.
        strict: strict ``load_state_dict`` (default).
        map_location: device for the weights (default CPU).
        example_input: input for the probe that finds the layers feeding the slots, for a
            checkpoint that does not record them (saved before they were recorded) of a model
            without ``example_input_array``; recorded feeders need no probe.
        **kwargs: init arguments overriding the checkpoint's saved hyperparameters.

    Returns:
        The model, with the weights loaded and the config it was trained with (if any) as
        ``model.autonorm_config``.

    Raises:
        AutoNormError: the checkpoint was not written with the AutoNorm callback.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    entry = read_entry(checkpoint)
    if entry is None:
        raise AutoNormError(
            f"{os.fspath(checkpoint_path)!r} holds no AutoNorm structure: it was not saved by a "
            f"Trainer with the AutoNorm callback; use {model_class.__name__}.load_from_checkpoint"
        )
    structure, config = entry
    hparams = {
        k: v
        for k, v in dict(checkpoint.get("hyper_parameters") or {}).items()
        if not k.startswith("_")
    }
    model = model_class(**{**hparams, **kwargs})
    _restore(model, checkpoint, structure, strict, map_location, example_input)
    if config is not None:
        model.autonorm_config = config  # type: ignore[assignment]
    return model


def restore_into(
    model: nn.Module, checkpoint_path: str | os.PathLike[str], *, example_input: Any = None
) -> nn.Module:
    """Give a freshly built ``model`` the layer structure and the weights of an AutoNorm
    checkpoint (a model built by a factory, where :func:`load_from_checkpoint` needs a class).

    Raises:
        AutoNormError: the checkpoint was not written with the AutoNorm callback.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    entry = read_entry(checkpoint)
    if entry is None:
        raise AutoNormError(f"{os.fspath(checkpoint_path)!r} holds no AutoNorm structure")
    _restore(model, checkpoint, entry[0], True, None, example_input)
    return model


def _restore(
    model: nn.Module,
    checkpoint: dict[str, Any],
    structure: NormConfig,
    strict: bool,
    map_location: Any,
    example_input: Any,
) -> None:
    # the feeders the training run's probe found: no probe (nor example input) needed
    feeders = entry_feeders(checkpoint) if example_input is None else None
    apply_config(model, structure, partial=True, example_input=example_input, feeders=feeders)
    state = checkpoint["state_dict"]
    if map_location is not None:
        state = {k: v.to(map_location) for k, v in state.items()}
    model.load_state_dict(state, strict=strict)
