"""Tiny LightningModules and data for callback and search tests (synthetic, CPU-fast).

Each class is built on ``pytorch_lightning``; the ``L``-prefixed twins (``LTinyConvNet``, ...)
are the same classes on ``lightning.pytorch``, where that namespace is installed:
:data:`NAMESPACES` parametrizes a test over both.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def synthetic_classification(n: int = 96, seed: int = 0) -> TensorDataset:
    """Two classes of 1-D signals separable by their mean: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, 16, generator=g) + (y.float() * 2 - 1)[:, None, None]
    return TensorDataset(x, y)


class _TinyData:
    def __init__(self, batch_size: int = 16, n: int = 96) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.n = n

    def setup(self, stage: str | None = None) -> None:
        self.train_set = synthetic_classification(self.n, seed=0)
        self.val_set = synthetic_classification(self.n // 2, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


class _TinyConvNet:
    """Conv1d -> BatchNorm1d -> ReLU -> Conv1d -> BatchNorm1d -> pool -> LayerNorm -> Linear."""

    def __init__(self, width: int = 8, lr: float = 0.05, fail_with: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv1d(2, width, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(width)
        self.head_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)
        self.example_input_array = torch.zeros(4, 2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(self.head_norm(x.mean(-1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hparams.fail_with == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        loss = F.cross_entropy(self(x), y)
        if self.hparams.fail_with == "nan":
            loss = loss * float("nan")
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class _NoNormNet:
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 2)

    def forward(self, x):
        return self.lin(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyDataModule(_TinyData, pl.LightningDataModule):
    pass


class TinyConvNet(_TinyConvNet, pl.LightningModule):
    pass


class NoNormNet(_NoNormNet, pl.LightningModule):
    pass


try:
    import lightning.pytorch as L
except ImportError:  # pytorch_lightning alone
    L = None
else:

    class LTinyDataModule(_TinyData, L.LightningDataModule):
        pass

    class LTinyConvNet(_TinyConvNet, L.LightningModule):
        pass

    class LNoNormNet(_NoNormNet, L.LightningModule):
        pass


#: ``pytest.mark.parametrize("namespace", NAMESPACES)``: each Lightning namespace, skipped where
#: it is not installed.
NAMESPACES = [
    pytest.param(pl, id="pytorch_lightning"),
    pytest.param(L, id="lightning", marks=pytest.mark.skipif(L is None, reason="no lightning")),
]


def models_of(namespace) -> tuple[type, type]:
    """``(TinyConvNet, TinyDataModule)`` of ``namespace``."""
    if namespace is pl:
        return TinyConvNet, TinyDataModule
    return LTinyConvNet, LTinyDataModule


def tiny_trainer(tmp_path, callbacks, max_epochs: int = 2, namespace=pl, **kwargs):
    defaults = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return namespace.Trainer(callbacks=callbacks, **defaults)


class NoExampleNet(TinyConvNet):
    """A model without ``example_input_array``: no probe finds the layers feeding its slots."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.example_input_array = None
