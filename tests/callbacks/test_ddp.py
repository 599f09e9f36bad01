"""AutoNorm under multi-process training: 2 CPU processes on the gloo backend (ddp_spawn)."""

from __future__ import annotations

import json

import optuna
import pytest
import pytorch_lightning as pl

import autonorm
from autonorm.callbacks import AutoNorm
from autonorm.norms import SwitchableNorm
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer


class RecordLayers(pl.Callback):
    """Each rank writes its slots' layers (and SN running means) after training."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        layers = {
            s.name: s.keep_choice().label for s in autonorm.find_slots(pl_module, probe=False)
        }
        means = {
            name: module.running_mean.tolist()
            for name, module in pl_module.named_modules()
            if isinstance(module, SwitchableNorm)
        }
        record = {"layers": layers, "means": means, "world": trainer.world_size}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def ddp_trainer(tmp_path, callbacks, **kwargs):
    return tiny_trainer(
        tmp_path, callbacks, accelerator="cpu", devices=2, strategy="ddp_spawn", **kwargs
    )


def ranks(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_search_mode_applies_the_same_trial_config_on_every_rank(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", sampler=optuna.samplers.RandomSampler(seed=3)
    )
    trial = study.ask()
    callback = AutoNorm(trial=trial, space="cnn", record_metrics=False)
    trainer = ddp_trainer(tmp_path, [callback, RecordLayers(tmp_path)], max_epochs=2)
    trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
    rank0, rank1 = ranks(tmp_path)
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["layers"] == rank1["layers"]
    frozen = study.trials[0]
    assert rank0["layers"] == {
        name: autonorm.NormChoice.parse(label).label for name, label in frozen.params.items()
    }
    assert set(frozen.intermediate_values) == {0, 1}  # reported once per epoch, by rank 0 only


@pytest.mark.slow
def test_learn_mode_trains_the_same_switchable_layers_on_every_rank(tmp_path):
    trainer = ddp_trainer(tmp_path, [AutoNorm(mode="learn"), RecordLayers(tmp_path)], max_epochs=1)
    trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
    rank0, rank1 = ranks(tmp_path)
    assert set(rank0["layers"].values()) == {"switchable"}
    assert rank0["means"] == rank1["means"]  # batch statistics gathered over both processes
