"""A user's project outside the package: the CLI and worker tests copy this file into a temporary
folder and name its classes by dotted path, as a user would."""

import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(pl.LightningModule):
    """Tiny; with ``sleep`` each training step sleeps, so a trial is clearly mid-flight."""

    def __init__(self, width: int = 8, lr: float = 0.05, sleep: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv1d(2, width, 3, padding=1)
        self.bn = nn.BatchNorm1d(width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)
        self.example_input_array = torch.zeros(4, 2, 16)

    def forward(self, x):
        return self.head(self.norm(F.relu(self.bn(self.conv(x))).mean(-1)))

    def training_step(self, batch, batch_idx):
        time.sleep(self.hparams.sleep)
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (64,), generator=g)
        x = torch.randn(64, 2, 16, generator=g) + (y.float() * 2 - 1)[:, None, None]
        self.train_set = TensorDataset(x, y)
        self.val_set = TensorDataset(x[:32], y[:32])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=32)
