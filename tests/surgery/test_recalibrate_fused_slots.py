"""Finalizing a learn run recalibrates the BatchNorm inside a fused norm+activation slot (timm
style), its activation kept after it."""

from __future__ import annotations

import torch

from autonorm.callbacks import AutoNorm
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer


class BatchNormAct1d(torch.nn.BatchNorm1d):
    """A fused norm+activation layer (timm style): batch norm, then its ``act`` child."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class FusedActNet(TinyConvNet):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bn1 = BatchNormAct1d(self.hparams.width)

    def forward(self, x):
        x = self.bn1(self.conv1(x))  # the fused layer applies the ReLU itself
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.head_norm(x.mean(-1)))


def test_finalize_recalibrates_fused_norm_activation_slots(tmp_path):
    callback = AutoNorm(mode="learn", finalize=True, candidates=("batch",), include="bn1")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    model = FusedActNet()
    trainer.fit(model, datamodule=TinyDataModule())
    assert callback.config["bn1"].name == "batchnorm"
    bn = model.bn1.norm  # the new BatchNorm inside the fused slot, its ReLU kept after it
    assert type(bn) is torch.nn.BatchNorm1d and isinstance(model.bn1.act, torch.nn.ReLU)
    data = TinyDataModule()
    data.setup()
    with torch.no_grad():  # the 6 training batches, all used (finalize_batches=20)
        inputs = model.conv1(data.train_set.tensors[0])
    assert int(bn.num_batches_tracked) == 6
    torch.testing.assert_close(bn.running_mean, inputs.mean((0, 2)), atol=1e-5, rtol=1e-4)
