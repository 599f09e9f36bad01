"""What every AutoNorm callback shares: rewrite a LightningModule's norm slots in ``setup``.

:class:`AutoNorm` is the base and the documented factory. Its subclasses each own one concern
and add their hooks to the base's: :class:`~autonorm.callbacks.LearnNorms` (learned
SwitchableNorm), :class:`~autonorm.callbacks.TrialNorms` (an Optuna trial's choices) and
:class:`~autonorm.callbacks.FixedNorms` (a saved config). ``AutoNorm(mode=...)`` builds the
mode's class, so code written against the single callback keeps working.

The base rewrites in ``setup`` (the last hook before ``configure_optimizers``, the move to the
device and the DDP wrap), measures training steps against the budget, writes the config at the
end of fit and stores the layer structure in checkpoints. The rewrite itself is
:mod:`autonorm.surgery`'s (which works without Lightning); checkpoints are
:mod:`~autonorm.callbacks._checkpoints`'.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
from collections.abc import Mapping, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import torch
from torch import nn
from typing_extensions import Self, TypedDict, override

from autonorm._errors import AutoNormError
from autonorm._lightning import callback_bases, is_global_zero, reduce_over_ranks
from autonorm.budget import Budget, as_budget, format_bytes
from autonorm.callbacks._checkpoints import (
    CHECKPOINT_KEY,
    checkpoint_entry,
    structure_from_checkpoint,
)
from autonorm.callbacks._measure import Measurements, TrainingStepRecorder, first_batch_size
from autonorm.config import NormConfig
from autonorm.norms import BatchRenorm
from autonorm.surgery import Slot, SlotPatterns, apply_config, find_slots, select_slots

if TYPE_CHECKING:
    from pytorch_lightning import Callback as _CallbackType
    from pytorch_lightning import LightningModule, Trainer
else:
    _CallbackType = object  # the real bases come per installed Lightning namespace, below

log = logging.getLogger(__name__)

MODES = ("learn", "search", "fixed")
#: Callbacks known to copy the model in their own ``setup``: re-run after the rewrite.
_COPYING_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging")
#: The class of each mode, filled in by the subclasses (``class LearnNorms(AutoNorm, mode=...)``).
_MODE_CLASSES: dict[str, type[AutoNorm]] = {}


def current_structure(
    model: nn.Module, feeders: Mapping[str, str | None] | None = None
) -> NormConfig:
    """The choice that rebuilds each slot's layer as it is now (what a checkpoint needs).

    Args:
        model: the model.
        feeders: ``{slot name: feeder name or None}`` as a probe found them: a rewrite of the
            norm layers leaves them as they are, so the model is not probed again. Without
            them the model is probed.
    """
    slots = find_slots(model, probe=feeders is None, feeders=feeders)
    config = NormConfig({s.name: s.keep_choice() for s in slots}, metadata={"source": "structure"})
    return config.with_probe(slots)


def _holds_module_copy(callback: object, model: nn.Module) -> bool:
    """Whether a callback keeps its own nn.Module (a copy of the model made before AutoNorm)."""
    return any(
        isinstance(value, nn.Module) and value is not model for value in vars(callback).values()
    )


def check_batch_size(trainer: Trainer, size: int, expected: int | None) -> None:
    """Check the first training batch's ``size`` against the budget's batch size.

    Raises:
        AutoNormError: the loaders train at another size than ``expected`` (they ignore the
            size autonorm set), naming both sizes.
    """
    if expected is None or size == expected:
        return
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    samples = len(dataset) if isinstance(dataset, Sized) else None  # an iterable says nothing
    if size < expected and samples is not None and size >= samples:
        return  # a dataset smaller than one batch
    raise AutoNormError(
        f"budget.batch_size={expected} but the first training batch holds {size} samples: "
        "the dataloaders ignore the batch size autonorm set (a datamodule's loaders must read "
        "its `batch_size` attribute or `hparams.batch_size`)"
    )


def memory_over_budget(
    trainer: Trainer, recorder: TrainingStepRecorder, budget: Budget | None
) -> str | None:
    """Why the run's peak memory breaks ``budget.max_memory``, or None. On several ranks the
    highest peak of all decides (a collective), so that every rank stops together."""
    limit = budget.max_memory if budget is not None else None
    if limit is None:
        return None
    (peak,) = reduce_over_ranks(trainer, [float(recorder.peak_memory)], op="max")
    if peak <= limit:
        return None
    return (
        f"peak memory {format_bytes(int(peak))} ({recorder.method}) > "
        f"budget max_memory={format_bytes(limit)}"
    )


def scale_renorm_schedules(model: nn.Module, total_steps: float) -> None:
    """Fit each Batch Renormalization layer's warm-up and ramp (given as the paper's 5000 and
    20000 steps, longer than most runs) to the run's ``total_steps`` optimizer steps; a
    schedule the user gave stays (:meth:`~autonorm.norms.BatchRenorm.scale_schedule`)."""
    if not math.isfinite(total_steps):
        return  # an endless run keeps the paper's schedule
    for module in model.modules():
        if isinstance(module, BatchRenorm):
            module.scale_schedule(int(total_steps))


def _no_slot_message(pl_module: nn.Module, include: SlotPatterns, exclude: SlotPatterns) -> str:
    selection = f" matching include={include!r} exclude={exclude!r}" if include or exclude else ""
    return (
        f"{type(pl_module).__name__} has no normalization slot{selection}: AutoNorm needs at "
        "least one BatchNorm/GroupNorm/InstanceNorm/LayerNorm/RMSNorm layer (or a class "
        "registered with autonorm.register_slot_type)"
    )


def _preceding_copies(me: object, trainer: Trainer, pl_module: nn.Module) -> list[Any]:
    """Callbacks listed before ``me`` that may already hold a copy of the old model."""
    preceding = []
    for callback in getattr(trainer, "callbacks", []):
        if callback is me:
            break
        if any(cls.__name__ in _COPYING_CALLBACKS for cls in type(callback).__mro__):
            preceding.append(callback)
        elif _holds_module_copy(callback, pl_module):
            raise AutoNormError(
                f"{type(callback).__name__} is listed before AutoNorm and already holds a copy "
                "of the model made before AutoNorm rewrote it; put AutoNorm first in "
                "Trainer(callbacks=[AutoNorm(...), ...])"
            )
    return preceding


def _mode_of(mode: str | None, trial: Any, config: Any) -> str:
    """The mode, inferred from ``trial``/``config`` when None and checked against them."""
    inferred = "search" if trial is not None else "fixed" if config is not None else "learn"
    if mode is None:
        mode = inferred
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if trial is not None and config is not None:
        raise ValueError("give either `trial` (search mode) or `config` (fixed mode), not both")
    if mode != inferred:
        need = {"search": "`trial`", "fixed": "`config`", "learn": "neither `trial` nor `config`"}
        raise ValueError(
            f"mode={mode!r} needs {need[mode]}; got mode={mode!r} with {inferred} inputs"
        )
    return mode


def _build_for_mode(mode: str | None = None, **kwargs: Any) -> AutoNorm:
    """``AutoNorm(mode=..., **kwargs)``: the mode's class. An argument of another mode left at
    its default (``trial=None``, ``init="uniform"``, ...) is dropped, as the single callback
    ignored it; one given a value is refused, naming its mode.

    Raises:
        ValueError: the mode does not fit ``trial``/``config``, or an argument of another mode.
        TypeError: an argument no mode takes.
    """
    mode = _mode_of(mode, kwargs.get("trial"), kwargs.get("config"))
    target = _MODE_CLASSES[mode]
    own = _accepted(target)
    defaults = {  # another mode's arguments, None for the required ones (trial, config)
        name: None if p.default is p.empty else p.default
        for cls in _MODE_CLASSES.values()
        for name, p in inspect.signature(vars(cls)["__init__"]).parameters.items()
        if name not in own and name != "self" and p.kind != p.VAR_KEYWORD
    }
    unknown = sorted(set(kwargs) - own - set(defaults))
    if unknown:
        raise TypeError(f"AutoNorm() got unexpected arguments {unknown}")
    stray = {name: v for name, v in kwargs.items() if name not in own and v != defaults[name]}
    if stray:
        owners = {
            name: "/".join(repr(m) for m, cls in _MODE_CLASSES.items() if name in _accepted(cls))
            for name in stray
        }
        problems = [f"`{name}` applies to mode={modes} only" for name, modes in owners.items()]
        raise ValueError("; ".join(problems) + f" (this AutoNorm has mode={mode!r})")
    return target(**{name: v for name, v in kwargs.items() if name in own})


class RewriteOptions(TypedDict, total=False):
    """The arguments every AutoNorm callback takes (documented on :class:`AutoNorm`)."""

    include: SlotPatterns
    exclude: SlotPatterns
    example_input: Any
    config_path: str | os.PathLike[str] | None
    record_metrics: bool
    budget: Budget | Mapping[str, Any] | None


def _accepted(cls: type) -> set[str]:
    """The keyword arguments ``cls`` takes: its own and :class:`RewriteOptions`."""
    params = inspect.signature(vars(cls)["__init__"]).parameters.values()
    return {p.name for p in params if p.kind != p.VAR_KEYWORD} | set(RewriteOptions.__annotations__)


class _ByMode(type):
    """``AutoNorm(...)`` builds the class of its mode; the subclasses build themselves."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is AutoNorm:
            return _build_for_mode(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class _RewriteBase(_CallbackType):
    """Namespace-independent body of :class:`AutoNorm` (mixed into each Lightning's Callback)."""

    mode: ClassVar[str]

    def __init__(
        self,
        *,
        include: SlotPatterns = None,
        exclude: SlotPatterns = None,
        example_input: Any = None,
        config_path: str | os.PathLike[str] | None = None,
        record_metrics: bool = True,
        budget: Budget | Mapping[str, Any] | None = None,
    ) -> None:
        self.include = include
        self.exclude = exclude
        self.example_input = example_input
        self.config_path = Path(config_path) if config_path is not None else None
        self.budget = as_budget(budget)
        if self.budget is not None and self.budget.max_memory is not None and not record_metrics:
            raise ValueError("`budget.max_memory` needs record_metrics=True (memory is measured)")
        self.recorder = TrainingStepRecorder() if record_metrics else None
        self.config: NormConfig | None = None
        self.slots: list[Slot] = []
        self.structure: NormConfig | None = None
        self._applied = False
        self._feeders: dict[str, str | None] | None = None  # the slots' feeders, from the probe

    # -- what each concern adds ----------------------------------------------------------------

    def _rewrite(
        self, trainer: Trainer, pl_module: nn.Module, found: list[Slot], example: Any
    ) -> None:
        """Rewrite the selected slots (:attr:`slots`); ``found`` holds every slot of the model."""
        raise NotImplementedError

    def _resumed(self, trainer: Trainer) -> None:
        """The fit resumes a checkpoint: its structure is applied instead of :meth:`_rewrite`."""

    def _over_budget(self, reason: str) -> NoReturn:
        """End a run that broke the budget."""
        raise AutoNormError(f"over budget: {reason}")

    def _observe_batch_size(self, trainer: Trainer, size: int) -> None:
        """The size of the first training batch, checked against the budget."""
        check_batch_size(trainer, size, self.budget.batch_size if self.budget else None)

    def for_ranks(self) -> Self:
        """This callback, not yet used, as the other ranks of a distributed training get it
        (pickled to them): a copy; the search-mode callback leaves its trial on rank 0."""
        return copy.copy(self)

    def measurements(self) -> Measurements:
        """The step recorder's summary so far (empty without ``record_metrics``)."""
        return self.recorder.summary() if self.recorder is not None else {}

    # -- setup: the rewrite --------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._applied:
            return  # validate/test after fit: the model is already rewritten
        preceding = _preceding_copies(self, trainer, pl_module)
        example = self.example_input
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        found = find_slots(pl_module, example)  # every slot, probed once
        self.slots = select_slots(found, self.include, self.exclude)
        if not self.slots:
            raise AutoNormError(_no_slot_message(pl_module, self.include, self.exclude))
        resumed = structure_from_checkpoint(getattr(trainer, "ckpt_path", None))
        if resumed is not None:  # the structure of the checkpoint the fit resumes from
            structure, config = resumed
            self.config = config if config is not None else self.config
            apply_config(pl_module, structure, partial=True, example_input=example, slots=found)
            self._resumed(trainer)
        else:
            self._rewrite(trainer, pl_module, found, example)
        self._applied = True
        self._feeders = {s.name: s.feeder for s in found}
        self.structure = current_structure(pl_module, self._feeders)
        for callback in preceding:
            callback.setup(trainer, pl_module, stage)  # let it copy the rewritten model
        self._check_params(trainer, sum(p.numel() for p in pl_module.parameters()))
        log.info(
            "AutoNorm (%s): rewrote %d slots of %s",
            self.mode,
            len(self.slots),
            type(pl_module).__name__,
        )

    def _check_params(self, trainer: Trainer, n_params: int) -> None:
        """The rewritten model's parameter count; over ``budget.max_params``: stop."""
        limit = self.budget.max_params if self.budget is not None else None
        if limit is not None and n_params > limit:
            self._over_budget(f"{n_params} parameters > budget max_params={limit}")

    @property
    def selective(self) -> bool:
        """Whether ``include``/``exclude`` select some slots (a config then names only those)."""
        return self.include is not None or self.exclude is not None

    # -- training steps: measured against the budget ------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:  # the size it really trains at
            size = first_batch_size(batch)
            if size is not None:
                self._observe_batch_size(trainer, size)
        if self.recorder is not None:
            self.recorder.batch_start(pl_module)

    @override
    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        if self.recorder is not None:
            self.recorder.forward_done()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is None:
            return
        self.recorder.batch_end(pl_module, trainer.optimizers)
        reason = memory_over_budget(trainer, self.recorder, self.budget)
        if reason is not None:
            self._over_budget(reason)

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if self.recorder is not None:  # a step that died mid-forward must not leave its hooks
            self.recorder.forward_done()

    # -- the end of fit, checkpoints -----------------------------------------------------------

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.config is not None:
            path = self.resolved_config_path(trainer)  # every rank: trainer.log_dir is a collective
            if is_global_zero(trainer):
                self.config.save(path)
                log.info("AutoNorm: wrote %s", path)
        if getattr(trainer, "world_size", 1) > 1:
            # ranks leave together: rank 0 hosts the process group's store, and a rank still
            # deriving its config when rank 0 exits aborts in gloo's teardown
            trainer.strategy.barrier("autonorm_fit_end")

    def resolved_config_path(self, trainer: Trainer) -> Path:
        """Where the derived/applied config is written."""
        if self.config_path is not None:
            return self.config_path
        folder = getattr(trainer, "log_dir", None) or trainer.default_root_dir
        return Path(folder) / "autonorm_config.yaml"

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the structure recorded after the rewrite (and after finalize): no probe per checkpoint
        structure = self.structure
        if structure is None:
            structure = current_structure(pl_module, self._feeders)
        checkpoint[CHECKPOINT_KEY] = checkpoint_entry(
            structure, self.config, self.mode, self._feeders
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "config": None if self.config is None else self.config.to_dict(),
            "structure": None if self.structure is None else self.structure.to_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        config = state_dict.get("config")
        if config is not None and self.config is None:
            self.config = NormConfig.from_dict(config)
        structure = state_dict.get("structure")
        if structure is not None:
            self.structure = NormConfig.from_dict(structure)


class AutoNorm(_RewriteBase, *callback_bases(), metaclass=_ByMode):  # type: ignore[misc]
    """Rewrite a LightningModule's norm slots: learned, searched, or from a saved config.

    ``AutoNorm(...)`` builds the callback of its mode, each a subclass of this one:
    ``"learn"``: :class:`~autonorm.callbacks.LearnNorms` (every slot becomes a
    :class:`~autonorm.norms.SwitchableNorm`; the derived discrete config is written at the end
    of fit); ``"search"``: :class:`~autonorm.callbacks.TrialNorms` (choices from an Optuna
    ``trial``; the monitored metric is reported and the trial pruned); ``"fixed"``:
    :class:`~autonorm.callbacks.FixedNorms` (a given ``config``). The mode is inferred from
    ``trial``/``config`` when omitted. The other arguments are those of the mode's class; the
    ones every mode takes:

    Args:
        mode: ``"learn"``, ``"search"`` or ``"fixed"``.
        **kwargs: the arguments of the mode's class. Every mode takes ``include`` and
            ``exclude`` (glob patterns on slot names selecting the slots to rewrite),
            ``example_input`` (input for the probe that records each slot's input shape;
            default: the module's ``example_input_array``), ``config_path`` (where to write
            the config at the end of fit; default: the trainer's log dir), ``record_metrics``
            (record step time and peak memory, and report them to the trial) and ``budget``
            (an :class:`~autonorm.Budget` or its dict: a run over it stops, a trial is pruned
            as infeasible).

    Raises:
        ValueError: invalid arguments (unknown mode, trial and config together, an argument
            of another mode, ...).

    Example::

        trainer = Trainer(callbacks=[AutoNorm(mode="learn", finalize=True)])
        trainer.fit(model, datamodule)
    """

    if TYPE_CHECKING:  # the factory's signature: the arguments of the mode's class

        def __init__(self, mode: str | None = None, **kwargs: Any) -> None: ...

    def __init_subclass__(cls, mode: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):  # help() and IDEs: the class's own arguments, not the
            init = inspect.signature(vars(cls)["__init__"])  # metaclass's (*args, **kwargs)
            cls.__signature__ = init.replace(parameters=list(init.parameters.values())[1:])
        if mode is not None:
            cls.mode = mode
            _MODE_CLASSES[mode] = cls

    @property
    def state_key(self) -> str:
        """One key for every mode: checkpoints restore into whichever class wrote them."""
        return "AutoNorm"

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        scale_renorm_schedules(pl_module, trainer.estimated_stepping_batches)
