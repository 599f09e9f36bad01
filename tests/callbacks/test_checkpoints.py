"""Checkpoints of rewritten models: resuming a fit and rebuilding the model."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import autonorm
from autonorm import AutoNormError, NormConfig
from autonorm.callbacks import AutoNorm, current_structure
from autonorm.callbacks._checkpoints import CHECKPOINT_KEY, load_checkpoint
from autonorm.norms import SwitchableNorm
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer


def test_checkpoint_round_trip_and_resume(tmp_path):
    model = TinyConvNet()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(
        tmp_path, [AutoNorm(mode="learn"), ckpt], max_epochs=2, enable_checkpointing=True
    )
    trainer.fit(model, datamodule=TinyDataModule())
    path = tmp_path / "ckpt" / "last.ckpt"

    loaded = autonorm.load_from_checkpoint(TinyConvNet, path)
    x = torch.randn(5, 2, 16)
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert isinstance(loaded.bn1, SwitchableNorm)

    with pytest.raises(RuntimeError, match="state_dict"):
        TinyConvNet.load_from_checkpoint(path)

    resumed = TinyConvNet()
    trainer2 = tiny_trainer(tmp_path, [AutoNorm(mode="learn")], max_epochs=3)
    trainer2.fit(resumed, datamodule=TinyDataModule(), ckpt_path=str(path))
    assert trainer2.global_step > trainer.global_step
    assert isinstance(resumed.bn1, SwitchableNorm)


def test_load_from_checkpoint_refuses_a_plain_checkpoint(tmp_path):
    model = TinyConvNet()
    trainer = tiny_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(model, datamodule=TinyDataModule())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(AutoNormError, match="load_from_checkpoint"):
        autonorm.load_from_checkpoint(TinyConvNet, tmp_path / "plain.ckpt")


def test_the_checkpoint_holds_the_structure_without_a_probe_per_save(tmp_path, counting_net):
    Counting, calls = counting_net
    model = Counting()
    callback = AutoNorm(
        config=NormConfig({"bn1": "groupnorm+ws", "bn2": "layernorm", "head_norm": "layernorm"})
    )
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model, datamodule=TinyDataModule())
    before = len(calls)
    for i in range(3):
        trainer.save_checkpoint(tmp_path / f"{i}.ckpt")
    assert len(calls) == before  # no probe forward pass when saving
    # recorded without a probe, the structure is what a probe of the rewritten model finds
    assert callback.structure == current_structure(model)
    assert callback.structure["bn1"].weight == "ws"
    entry = load_checkpoint(tmp_path / "2.ckpt")[CHECKPOINT_KEY]
    assert entry["mode"] == "fixed"
    assert entry["structure"] == callback.structure.to_dict()
    structure = NormConfig.from_dict(entry["structure"])
    assert {n: c.name for n, c in structure.choices.items()} == {
        "bn1": "groupnorm",
        "bn2": "layernorm",
        "head_norm": "layernorm",
    }
    loaded = autonorm.load_from_checkpoint(Counting, tmp_path / "2.ckpt")
    assert isinstance(loaded.bn1, torch.nn.GroupNorm)
    assert loaded.autonorm_config == callback.config
