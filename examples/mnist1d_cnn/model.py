"""A small 1-D CNN for MNIST-1D with BatchNorm slots (the usual habit autonorm questions)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class MNIST1DCNN(pl.LightningModule):
    """Three conv blocks, global average pooling, a linear head with a BatchNorm1d before it.

    Args:
        width: channels of the first block (doubled in the later blocks).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, width: int = 16, lr: float = 3e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            ConvBlock(1, width),
            ConvBlock(width, 2 * width, stride=2),
            ConvBlock(2 * width, 2 * width, stride=2),
        )
        self.head_norm = nn.BatchNorm1d(2 * width)
        self.head = nn.Linear(2 * width, 10)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)
        self.example_input_array = torch.zeros(4, 1, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x).mean(-1)
        return self.head(self.head_norm(features))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
