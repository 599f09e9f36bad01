"""The trainings of a search: a fresh model and data for each, at the budget's per-device batch
size, with the Trainer's trial defaults; a trial, the learn pass and the final retraining."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from autonorm import _trial_keys as keys
from autonorm._errors import AutoNormError
from autonorm._lightning import free_memory, namespace_of, quiet_lightning
from autonorm.budget import Budget
from autonorm.callbacks import (
    AutoNorm,
    FixedNorms,
    LearnNorms,
    TrialNorms,
    TrialTask,
    infeasible_reason,
    mark_infeasible,
    restore_into,
)
from autonorm.config import NormConfig
from autonorm.search._ranks import RankFailed, RankGroup, RankJob, RankLayout, rank_layout
from autonorm.search._settings import EXTRA_OBJECTIVES, SearchSettings
from autonorm.search_spaces import SearchSpace
from autonorm.surgery import Slot, SlotEvidence, SlotPatterns, perturb_slots

log = logging.getLogger(__name__)


def model_factory(model: Any, model_kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    if inspect.isclass(model):
        if not issubclass(model, nn.Module):
            raise ValueError(
                f"`model` must be a LightningModule class or a factory, got class {model.__name__}"
            )
        return functools.partial(model, **model_kwargs)  # keeps the class: its namespace
    if isinstance(model, nn.Module):
        raise ValueError(
            "`model` must be a LightningModule class or a zero-argument factory, not an instance: "
            "every trial needs a fresh model"
        )
    if callable(model):
        if model_kwargs:
            raise ValueError("`model_kwargs` applies to a model class, not to a factory")
        return model
    raise ValueError(f"`model` must be a LightningModule class or a factory, got {model!r}")


class _Given:
    """A factory of the one datamodule the user gave (picklable, for spawned ranks)."""

    def __init__(self, datamodule: Any) -> None:
        self.datamodule = datamodule

    def __call__(self) -> Any:
        return self.datamodule


def datamodule_factory(datamodule: Any) -> Callable[[], Any] | None:
    if datamodule is None:
        return None
    if inspect.isclass(datamodule) or (
        callable(datamodule) and not hasattr(datamodule, "train_dataloader")
    ):
        return datamodule
    return _Given(datamodule)


def trial_callbacks(given: Any) -> list[Any]:
    """The user's Lightning callbacks for one training, its own: a fresh copy of each (an
    EarlyStopping or ModelCheckpoint keeps its best score and paths: shared, the first trial's
    would stop or overwrite the next), or what a factory (``lambda: [EarlyStopping(...)]``)
    returns.

    Raises:
        AutoNormError: a callback that cannot be copied, naming it and the factory form.
    """
    if given is None:
        return []
    if callable(given) and not hasattr(given, "setup"):  # a factory, not a callback
        made = given()
        return list(made) if isinstance(made, (list, tuple)) else [made]
    callbacks = list(given) if isinstance(given, (list, tuple)) else [given]
    copies = []
    for callback in callbacks:
        try:
            copies.append(copy.deepcopy(callback))
        except Exception as err:
            raise AutoNormError(
                f"trainer callback {type(callback).__name__} cannot be copied for each trial "
                f"({type(err).__name__}: {err}); pass a factory instead: "
                f"trainer_kwargs={{'callbacks': lambda: [{type(callback).__name__}(...)]}}"
            ) from None
    return copies


def _set_batch_size(datamodule: Any, loaders: dict[str, Any], batch_size: int) -> None:
    """Train at the budget's per-device batch size: on the datamodule or the dataloaders."""
    if datamodule is not None:
        _set_datamodule_batch_size(datamodule, batch_size)
    for key, loader in list(loaders.items()):
        if loader is not None:
            loaders[key] = _rebatch(loader, batch_size, shuffle=key == "train")


def _set_datamodule_batch_size(datamodule: Any, batch_size: int) -> None:
    """Set both the ``batch_size`` attribute and the ``hparams`` entry the datamodule has: its
    loaders may read either (the callback checks the first batch's size against the budget)."""
    hparams: Any = getattr(datamodule, "hparams", None)
    in_hparams = hparams is not None and "batch_size" in hparams
    if not hasattr(datamodule, "batch_size") and not in_hparams:
        raise AutoNormError(
            f"budget.batch_size={batch_size} needs {type(datamodule).__name__} to have a "
            "`batch_size` attribute (or hparams entry) that its dataloaders use"
        )
    if hasattr(datamodule, "batch_size"):
        datamodule.batch_size = batch_size
    if in_hparams:
        hparams["batch_size"] = batch_size


def _rebatch(loader: Any, batch_size: int, *, shuffle: bool) -> Any:
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise AutoNormError(
            f"budget.batch_size needs torch DataLoaders (or a datamodule), got {type(loader).__name__}"
        )
    return torch.utils.data.DataLoader(
        loader.dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last or shuffle,  # a last training batch of 1 breaks batch stats
        pin_memory=loader.pin_memory,
    )


@dataclass(kw_only=True)
class Training:
    """How every training run of a search is set up: fresh model and data, the budget's
    per-device batch size, the Trainer's trial defaults, the slot selection."""

    make_model: Callable[[], nn.Module]
    make_datamodule: Callable[[], Any] | None = None
    train_dataloaders: Any = None
    val_dataloaders: Any = None
    budget: Budget | None = None
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    example_input: Any = None
    include: SlotPatterns = None
    exclude: SlotPatterns = None
    verbose: bool = False
    #: how each training runs on several ranks (None: in this process alone)
    layout: RankLayout | None = None
    #: the other ranks, started at the first training (rank 0's side)
    ranks: RankGroup | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "ranks": None}  # a spawned rank gets the setup, not the group

    @classmethod
    def for_search(
        cls,
        settings: SearchSettings,
        make_model: Callable[[], nn.Module],
        make_datamodule: Callable[[], Any] | None,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
    ) -> Training:
        """How the search with ``settings`` trains (on several ranks where its Trainer
        arguments ask for several devices)."""
        layout = rank_layout(
            namespace_of(make_model), settings.trainer_kwargs, settings.collective_timeout
        )
        return cls(
            make_model=make_model,
            make_datamodule=make_datamodule,
            train_dataloaders=train_dataloaders,
            val_dataloaders=val_dataloaders,
            budget=settings.budget,
            trainer_kwargs=settings.trainer_kwargs,
            example_input=settings.example_input,
            include=settings.include,
            exclude=settings.exclude,
            verbose=settings.verbose,
            layout=layout,
        )

    def fit(
        self,
        callback: AutoNorm,
        *,
        root: Path,
        seed: int | None,
        ckpt_path: Path | None = None,
        save_to: Path | None = None,
    ) -> Any:
        """Seed, build a fresh model and data, train with ``callback`` first among callbacks
        (continuing ``ckpt_path`` when given; saving the checkpoint at ``save_to`` after);
        return the Trainer. On several ranks every rank does the same (this process is rank 0).

        Raises:
            RankFailed: another rank died, stopped answering or failed.
        """
        job = RankJob(callback, root, seed, ckpt_path, save_to)
        if self.layout is None:
            return train_job(self, job)
        if self.ranks is None:
            spawned = self.layout.start_method != "popen"
            self.ranks = RankGroup(self.layout, (train_job, self) if spawned else None)
        return self.ranks.run(job, lambda: train_job(self, job))

    @property
    def world(self) -> int:
        """How many ranks (processes, devices) each training runs on."""
        return 1 if self.layout is None else self.layout.world

    def close(self) -> None:
        """Stop the other ranks (the search is over)."""
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None

    def perturb(
        self, checkpoint: Path, slots: list[Slot], *, monitor: str, maximize: bool
    ) -> SlotEvidence:
        """Per-slot evidence from the SwitchableNorm model saved at ``checkpoint``: each slot's
        candidates forced one at a time, the monitored metric of a validation pass after each
        (:func:`~autonorm.surgery.perturb_slots`)."""
        model = restore_into(self.make_model(), checkpoint, example_input=self.example_input)
        pl = namespace_of(model)
        dm, loaders = self.data(train=None)
        kwargs = self.trainer_arguments(checkpoint.parent, single_device=True)
        kwargs["callbacks"] = []
        with quiet_lightning(not self.verbose):
            trainer: Any = pl.Trainer(**kwargs)

        def validate(module: nn.Module) -> float:
            with quiet_lightning(not self.verbose):
                if dm is not None:
                    metrics = trainer.validate(module, datamodule=dm, verbose=False)
                else:
                    metrics = trainer.validate(module, dataloaders=loaders["val"], verbose=False)
            value = metrics[0].get(monitor) if metrics else None
            if value is None:
                raise AutoNormError(f"monitor {monitor!r} was not logged in validation")
            return float(value)

        return perturb_slots(model, slots, validate, maximize=maximize)

    def data(self, train: Any) -> tuple[Any, dict[str, Any]]:
        """A fresh datamodule (or the ``train`` and validation loaders), at the budget's
        per-device batch size."""
        dm = self.make_datamodule() if self.make_datamodule is not None else None
        loaders = {"train": train, "val": self.val_dataloaders}
        if self.budget is not None and self.budget.batch_size is not None:
            _set_batch_size(dm, loaders, self.budget.batch_size)
        return dm, loaders

    def trainer_arguments(self, root: Path, *, single_device: bool = False) -> dict[str, Any]:
        """The Trainer's arguments: the trial defaults, the user's, and on several ranks a
        fresh strategy that joins the ranks autonorm started; ``single_device``: validation
        passes rank 0 runs alone."""
        kwargs = {
            "accelerator": "auto",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": self.verbose,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(root),
            **self.trainer_kwargs,
        }
        if single_device:
            kwargs.update(devices=1, strategy="auto", num_nodes=1)
        elif self.layout is not None:
            kwargs["strategy"] = self.layout.strategy()
        return kwargs

    def slot_selection(self) -> dict[str, Any]:
        """The callback arguments that select and probe the slots, as the search found them."""
        return {
            "include": self.include,
            "exclude": self.exclude,
            "example_input": self.example_input,
        }


def train_job(training: Training, job: RankJob) -> Any:
    """One rank's part of a training: seed, build a fresh model and data, train with the
    job's callback first among callbacks; return the Trainer."""
    if job.seed is not None:  # before the model exists: its class's namespace, when known
        namespace_of(training.make_model).seed_everything(job.seed, workers=True, verbose=False)
    module = training.make_model()
    pl = namespace_of(module)  # the Trainer of the module's own Lightning
    dm, loaders = training.data(training.train_dataloaders)
    kwargs = training.trainer_arguments(job.root)
    kwargs["callbacks"] = [job.callback, *trial_callbacks(training.trainer_kwargs.get("callbacks"))]
    resume = None if job.ckpt_path is None else str(job.ckpt_path)
    # every training of a search (trial, learn pass, retraining, any rank) is quiet here: no
    # banner per trial in a log; the user's own prints and warnings still show
    with quiet_lightning(not training.verbose):
        trainer: Any = pl.Trainer(**kwargs)  # typed for LightningModule; the model is one
        if dm is not None:
            trainer.fit(module, datamodule=dm, ckpt_path=resume)
        else:
            trainer.fit(
                module,
                train_dataloaders=loaders["train"],
                val_dataloaders=loaders["val"],
                ckpt_path=resume,
            )
        if job.save_to is not None:  # every rank takes part (Lightning's barrier); rank 0 writes
            trainer.save_checkpoint(job.save_to)
    return trainer


def run_trial(
    trial: optuna.Trial,
    training: Training,
    *,
    task: TrialTask,
    space: SearchSpace,
    monitor: str,
    objectives: list[str],
    out_dir: Path,
) -> float | list[float]:
    """Train the trial's config as ``task`` asks (its seed, its rung, the checkpoint it
    continues); return its objective values. The callback decides what is infeasible or pruned
    (it raises ``TrialPruned``); an out-of-memory error (on any rank), or a batch too small
    for batch statistics, is infeasible."""
    callback = TrialNorms(
        trial,
        space=space,
        monitor=monitor,
        task=task,
        budget=training.budget,
        **training.slot_selection(),
    )
    try:
        trainer = training.fit(
            callback, root=out_dir / "trials", seed=task.seed, ckpt_path=task.resume_from
        )
    except optuna.TrialPruned:
        raise
    except Exception as err:  # on another rank: out of memory there is infeasible too
        reason = err.infeasible if isinstance(err, RankFailed) else infeasible_reason(err)
        if reason is None:
            raise
        free_memory()
        if keys.FEASIBLE not in trial.user_attrs:  # it struck before fit reached the callback
            mark_infeasible(trial, reason, {})
        raise optuna.TrialPruned(reason) from None
    outcome = callback.outcome(trainer)
    values = [outcome.value]
    for name in objectives[1:]:
        key = EXTRA_OBJECTIVES[name]
        if key not in outcome.measurements:
            raise AutoNormError(f"objective {name!r} was not measured in trial {trial.number}")
        values.append(float(outcome.measurements[key]))
    return values[0] if len(values) == 1 else values


#: The learn pass's derived config and the best config's retrained checkpoint, in the bundle.
LEARNED_CONFIG_FILE = "learned_config.yaml"
BEST_CHECKPOINT_FILE = "best.ckpt"

#: The learn pass's mixing logits train at this fraction of the model's learning rate, without
#: weight decay (the benchmark's learned paths use the same).
LEARN_MIXING_LR_SCALE = 0.1


def learn_pass(
    training: Training,
    out_dir: Path,
    settings: SearchSettings,
    mixing: str = "softmax",
) -> NormConfig:
    """One learned SwitchableNorm run, its config derived by perturbation on the search's
    monitor (where the run's validation allows, else from the weights), the learned weights in
    its metadata. ``mixing="sparsestmax"`` (Sparse SN): every slot ends on exactly one normalizer,
    no argmax gap; but in short runs its mixing logits barely move before the radius schedule
    makes them one-hot, so the choice follows the seed (see the README's benchmark)."""
    callback = LearnNorms(
        mixing=mixing,
        mixing_lr_scale=LEARN_MIXING_LR_SCALE,
        mixing_weight_decay=0.0,
        monitor=settings.monitor,
        monitor_mode=settings.mode,
        config_path=out_dir / LEARNED_CONFIG_FILE,
        record_metrics=False,
        **training.slot_selection(),
    )
    training.fit(callback, root=out_dir / "learn", seed=settings.seed)
    assert callback.config is not None
    return callback.config


def retrain_best(
    config: NormConfig,
    make_model: Callable[[], nn.Module],
    make_datamodule: Callable[[], Any] | None,
    settings: SearchSettings,
    out_dir: Path,
) -> Path:
    """Train ``config`` once more as the search with ``settings`` trains (for a bundle written
    by another process than the trials, e.g. a worker pool's parent); returns the checkpoint's
    path in ``out_dir``. The search's slot selection applies: a config of included slots is
    partial."""
    training = Training.for_search(settings, make_model, make_datamodule)
    try:
        return retrain(config, training, out_dir, settings.seed)
    finally:
        training.close()


def retrain(config: NormConfig, training: Training, out_dir: Path, seed: int | None) -> Path:
    """Train the best config once more for the full schedule; save its checkpoint."""
    # the search's slot selection: a config of included slots is partial, the others keep theirs
    callback = FixedNorms(config, record_metrics=False, **training.slot_selection())
    path = out_dir / BEST_CHECKPOINT_FILE
    training.fit(callback, root=out_dir / "retrain", seed=seed, save_to=path)
    return path
