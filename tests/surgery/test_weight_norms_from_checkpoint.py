"""Weight-side choices (+ws, +wn) come back from a checkpoint: ``load_from_checkpoint`` puts them
on the feeders the checkpoint recorded, for a model without an example input (no probe)."""

from __future__ import annotations

import torch

import autonorm
from autonorm import NormConfig
from autonorm.callbacks import AutoNorm
from autonorm.norms._weight import weight_norm_of
from tests.lightning_models import NoExampleNet, TinyDataModule, tiny_trainer


def test_load_from_checkpoint_restores_ws_wn_without_example_input(tmp_path):
    config = NormConfig({"bn1": "groupnorm+ws", "bn2": "batchnorm+wn", "head_norm": "layernorm"})
    callback = AutoNorm(config=config, example_input=torch.zeros(4, 2, 16))
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    trained = NoExampleNet()
    trainer.fit(trained, datamodule=TinyDataModule())
    trainer.save_checkpoint(tmp_path / "ws.ckpt")
    loaded = autonorm.load_from_checkpoint(NoExampleNet, tmp_path / "ws.ckpt")
    assert weight_norm_of(loaded.conv1) == "ws"
    assert weight_norm_of(loaded.conv2) == "wn"
    x = torch.randn(5, 2, 16)
    torch.testing.assert_close(loaded.eval()(x), trained.eval()(x))
