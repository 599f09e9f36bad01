"""Promotions continue their screened run: a run stopped at its rung and continued from its
checkpoint is the same run as one trained from scratch with the same seed (deterministic CPU),
and the compute counts only the epochs really trained. Real Lightning Trainers, real Optuna
studies, real checkpoints."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import torch.nn.functional as F

import autonorm
from autonorm import _trial_keys as keys
from autonorm.search._planned import PROMOTE, SCREEN, Candidate, Continued, Planned, trial_task
from autonorm.search._training import Training, run_trial
from autonorm.search_spaces import resolve_space
from tests.lightning_models import TinyConvNet, TinyDataModule

MAX_EPOCHS, RUNG = 5, 2


class NoisyNet(TinyConvNet):
    """Draws random numbers every step (dropout) and follows a schedule over ``max_epochs``:
    a continued run matches only if the data order, the generators and the schedule do."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(F.dropout(x, 0.3)), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def _train(study, tmp_path, planned: Planned) -> optuna.trial.FrozenTrial:
    study.enqueue_trial(planned.candidate.params, user_attrs=planned.user_attrs())
    training = Training(
        make_model=NoisyNet,
        make_datamodule=TinyDataModule,
        trainer_kwargs={"max_epochs": MAX_EPOCHS, "accelerator": "cpu"},
    )

    def objective(trial):
        task = trial_task(trial.number, trial.user_attrs, checkpoints=tmp_path, base_seed=11)
        return run_trial(
            trial,
            training,
            task=task,
            space=resolve_space("minimal"),
            monitor="val_loss",
            objectives=["metric"],
            out_dir=tmp_path,
        )

    study.optimize(objective, n_trials=1)
    return study.trials[-1]


def test_a_continued_promotion_is_the_full_run_of_the_same_seed(tmp_path):
    study = optuna.create_study()
    groups = "groupnorm(groups=2)"
    config = Candidate("x", {"bn1": groups, "bn2": groups, "head_norm": "layernorm"})
    screened = _train(study, tmp_path, Planned(SCREEN, config, rung=RUNG))
    assert screened.state == optuna.trial.TrialState.PRUNED
    assert (tmp_path / f"trial-{screened.number}.ckpt").is_file()
    continued = _train(
        study, tmp_path, Planned(PROMOTE, config, continues=Continued(screened.number, RUNG))
    )
    from_scratch = _train(study, tmp_path, Planned(PROMOTE, config))
    assert continued.state == from_scratch.state == optuna.trial.TrialState.COMPLETE
    # the same run: every epoch after the rung, and the end, to the last bit
    for epoch in range(RUNG, MAX_EPOCHS):
        assert continued.intermediate_values[epoch] == from_scratch.intermediate_values[epoch]
    assert continued.value == from_scratch.value
    assert screened.intermediate_values[RUNG - 1] == from_scratch.intermediate_values[RUNG - 1]
    # it trained only the rest of the schedule, and recorded its parameters as a run does
    assert continued.user_attrs[keys.EPOCHS] == MAX_EPOCHS - RUNG
    assert from_scratch.user_attrs[keys.EPOCHS] == MAX_EPOCHS
    assert continued.params == from_scratch.params == config.params
    # another seed is another run
    other = _train(study, tmp_path, Planned(PROMOTE, config, run=1))
    assert other.value != from_scratch.value


def test_the_default_search_continues_its_promotions_and_counts_only_epochs_trained(tmp_path):
    result = autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        trainer_kwargs={"max_epochs": 3},
        out_dir=tmp_path / "run",
        seed=0,
        space="minimal",
    )
    trials = result.study.trials
    promoted = [t for t in trials if t.user_attrs.get(keys.STAGE) == PROMOTE]
    assert promoted and all(keys.CONTINUES in t.user_attrs for t in promoted)
    assert all(t.user_attrs[keys.EPOCHS] == 2 for t in promoted)  # 3 epochs, rung of 1
    own = [t for t in promoted if t.user_attrs.get(keys.INCUMBENT)]
    assert len(own) == 1 and own[0].user_attrs[keys.BASELINE] == "own norms"
    summary = json.loads((result.out_dir / "summary.json").read_text())
    trained = sum(t.user_attrs.get(keys.EPOCHS, 0) for t in trials)
    assert summary["compute"]["epochs"] == trained
    assert summary["compute"]["trainings"] <= summary["compute"]["budget_trainings"]
    assert not (result.out_dir / "checkpoints").exists()  # no rung state left behind


@pytest.mark.parametrize("seed", [None, 3])
def test_every_config_s_first_run_shares_its_seed_also_without_a_seed(tmp_path, seed):
    result = autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        trainer_kwargs={"max_epochs": 1},
        out_dir=tmp_path / "run",
        seed=seed,
        space="minimal",
        n_trials=2,
        warm_start=False,
    )
    trials = result.study.trials
    assert {t.user_attrs.get(keys.RUN_INDEX, 0) for t in trials} == {0}
    if seed is None:  # drawn once for the study, so that reruns pair with the first runs
        assert isinstance(result.study.user_attrs[keys.RUN_SEED], int)


def test_validation_every_other_epoch_still_ranks_the_screen_and_counts_every_epoch(tmp_path):
    """With check_val_every_n_epoch=2 the rung's last epoch has no validation: the screen stops
    at the first validation after it, ranks by that value, and every epoch trained counts."""
    result = autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        trainer_kwargs={"max_epochs": 6, "check_val_every_n_epoch": 2},
        out_dir=tmp_path / "run",
        seed=0,
        space="minimal",
        budget={"trainings": 3},
    )
    trials = result.study.trials
    screened = [t for t in trials if t.user_attrs.get(keys.STAGE) == SCREEN]
    assert screened and all(t.user_attrs[keys.EPOCHS] == 2 for t in screened)  # rung 2
    assert all(sorted(t.intermediate_values) == [1] for t in screened)
    promoted = [t for t in trials if t.user_attrs.get(keys.STAGE) == PROMOTE]
    assert promoted and all(t.user_attrs[keys.EPOCHS] == 4 for t in promoted)
    assert all(sorted(t.intermediate_values) == [1, 3, 5] for t in promoted)
    spent = sum(t.user_attrs.get(keys.EPOCHS, 0) for t in trials)
    assert result.summary["compute"]["epochs"] == spent <= 3 * 6


def test_a_sampler_search_without_a_warm_start_stops_at_the_grid_s_compute(tmp_path):
    result = autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        trainer_kwargs={"max_epochs": 1},
        out_dir=tmp_path / "run",
        seed=0,
        space="minimal",
        warm_start=False,
        pruner="none",
    )
    compute = result.summary["compute"]
    # the grid of the minimal space: the own norms and the uniform families it offers
    assert compute["budget_trainings"] == 3
    assert len(result.study.trials) == 3 and compute["trainings"] == 3
