"""What the staged plan stores on the trials it enqueues, and what a trial reads back: the
stages, a planned config (:class:`Candidate`), a planned trial (:class:`Planned`: its stage,
rung, round, run index and the screened run it continues), and the :class:`TrialTask` a trial
is asked to do (:func:`trial_task`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autonorm import _trial_keys as keys
from autonorm.callbacks import TrialTask

log = logging.getLogger(__name__)

SCREEN, PROMOTE, REFINE, CONFIRM = "screen", "promote", "refine", "confirm"
#: Successive halving's reduction factor: the rung is ``max_epochs / ETA`` epochs.
ETA = 3


def rung_epochs(max_epochs: int) -> int:
    """Epochs of a screening trial: a third of the schedule, at least one."""
    return max(1, round(max_epochs / ETA))


@dataclass(frozen=True)
class Candidate:
    """A planned config: its label (``uniform:groupnorm``, ``refine: role:head <- ...``) and
    the trial parameters that give it."""

    label: str
    params: dict[str, str]
    #: whether (and how strongly) the search keeps this config unless the evidence says another
    #: is better: 0, ``OWN_NORMS_GUARD`` or ``DEFAULT_GUARD`` (``_trial_keys``)
    incumbent: int = 0


@dataclass(frozen=True)
class Continued:
    """The screened run a promotion continues: its trial and the epochs it trained."""

    trial: int
    epochs: int


@dataclass(frozen=True)
class Planned:
    """A trial the plan wants next: its stage and config, the rung it stops at, its refinement
    round, which run of the config it is (its seed), and the screened run it continues."""

    stage: str
    candidate: Candidate
    rung: int | None = None
    round: int = 0
    run: int = 0
    continues: Continued | None = None

    def user_attrs(self) -> dict[str, Any]:
        """What the study stores of the planned trial (read back by :func:`trial_task`)."""
        attrs: dict[str, Any] = {
            keys.STAGE: self.stage,
            keys.BASELINE: self.candidate.label,
            keys.ROUND: self.round,
            keys.RUN_INDEX: self.run,
        }
        if self.rung is not None:
            attrs[keys.RUNG_EPOCHS] = self.rung
        if self.continues is not None:
            attrs[keys.CONTINUES] = self.continues.trial
            attrs[keys.START_EPOCH] = self.continues.epochs
        if self.candidate.incumbent:
            attrs[keys.INCUMBENT] = self.candidate.incumbent
        return attrs


def checkpoint_path(folder: Path, trial_number: int) -> Path:
    """Where trial ``trial_number`` saves its rung checkpoint in the run folder's ``folder``."""
    return folder / f"trial-{trial_number}.ckpt"


def trial_task(
    number: int,
    user_attrs: Mapping[str, Any],
    *,
    checkpoints: Path | None = None,
    base_seed: int = 0,
) -> TrialTask:
    """What trial ``number`` is asked to do, from what the plan stored when it enqueued it: its
    stage, the rung it stops at (saving a checkpoint in ``checkpoints``), the checkpoint it
    continues, its seed (``base_seed`` plus which run of its config it is). A planned trial
    stops where the plan says, never earlier by the pruner; a trial the sampler proposed has no
    stage: the full schedule, prunable."""
    stage = user_attrs.get(keys.STAGE)
    rung = user_attrs.get(keys.RUNG_EPOCHS)
    resume_from = None
    continues = user_attrs.get(keys.CONTINUES)
    if continues is not None and checkpoints is not None:
        resume_from = checkpoint_path(checkpoints, int(continues))
        if not resume_from.is_file():
            log.warning(
                "trial %d continues trial %s, whose checkpoint %s is gone (another host's "
                "folder, or removed): it trains the full schedule from scratch",
                number,
                continues,
                resume_from,
            )
            resume_from = None
    checkpoint = None
    if rung is not None and checkpoints is not None:
        checkpoint = checkpoint_path(checkpoints, number)
    return TrialTask(
        stage=None if stage is None else str(stage),
        stop_after=None if rung is None else int(rung),
        prunable=stage is None,
        seed=base_seed + int(user_attrs.get(keys.RUN_INDEX, 0)),
        checkpoint=checkpoint,
        resume_from=resume_from,
    )


def continue_values(study: optuna.Study, trial: optuna.Trial) -> None:
    """Report on ``trial`` the values its continued screened run reported before it stopped:
    the continued trial's curve is the whole run's, as a full run's would be."""
    continued = study._storage.get_trial(
        study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, int(trial.user_attrs[keys.CONTINUES])
        )
    )
    start = int(trial.user_attrs.get(keys.START_EPOCH, 0))
    for step, value in sorted(continued.intermediate_values.items()):
        if step < start:
            trial.report(value, step=step)
